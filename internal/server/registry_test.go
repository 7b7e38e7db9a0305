package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"wsp/internal/httperr"
)

// fakeSession is a registry entry without a connection: the registry never
// touches the embedded *tunnel.Session.
func fakeSession(clientID string, maxStreams, inflight int64) *session {
	s := &session{clientID: clientID, id: fmt.Sprintf("%s-%p", clientID, new(byte)), maxStreams: maxStreams}
	s.inflight.Store(inflight)
	return s
}

func registryWith(list ...*session) *registry {
	r := newRegistry()
	for _, s := range list {
		r.add(s)
	}
	return r
}

func TestChoose(t *testing.T) {
	type state struct{ max, inflight int64 }
	for _, tc := range []struct {
		name     string
		sessions []state
		gone     []int // indexes marked gone
		tried    []int // indexes already tried
		sample   bool
		want     int // index chosen; -1 for none
		wantBusy int // when none is chosen
	}{
		{name: "least in-flight wins", sessions: []state{{4, 2}, {4, 0}, {4, 1}}, want: 1},
		{name: "least in-flight wins, last", sessions: []state{{4, 3}, {4, 2}, {4, 1}}, want: 2},
		{name: "tried skipped", sessions: []state{{4, 2}, {4, 0}, {4, 1}}, tried: []int{1}, want: 2},
		{name: "all tried", sessions: []state{{4, 0}, {4, 0}}, tried: []int{0, 1}, want: -1},
		{name: "gone skipped", sessions: []state{{4, 2}, {4, 0}}, gone: []int{1}, want: 0},
		{name: "full skipped", sessions: []state{{2, 2}, {4, 3}}, want: 1},
		{name: "all full", sessions: []state{{2, 2}, {1, 1}, {3, 3}}, want: -1, wantBusy: 3},
		{name: "all full sampled", sessions: []state{{2, 2}, {1, 1}, {3, 3}}, sample: true, want: -1, wantBusy: 3},
		{name: "full and tried", sessions: []state{{1, 1}, {4, 0}}, tried: []int{1}, want: -1, wantBusy: 1},
		{name: "sampled skips full", sessions: []state{{1, 1}, {1, 1}, {1, 0}, {1, 1}}, sample: true, want: 2},
		{name: "sampled skips tried", sessions: []state{{9, 0}, {9, 0}, {9, 0}}, tried: []int{0, 2}, sample: true, want: 1},
		{name: "empty", want: -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Sampling is random: repeat to cover its paths.
			for range 50 {
				var list, tried []*session
				for _, st := range tc.sessions {
					list = append(list, fakeSession("c", st.max, st.inflight))
				}
				for _, i := range tc.gone {
					list[i].gone.Store(true)
				}
				for _, i := range tc.tried {
					tried = append(tried, list[i])
				}
				s, busy, _ := choose(list, tc.sample, tried, nil)
				if tc.want < 0 {
					if s != nil || busy != tc.wantBusy {
						t.Fatalf("got session %v busy %d, want none, busy %d", s, busy, tc.wantBusy)
					}
				} else if s != list[tc.want] {
					t.Fatalf("got %v, want session %d", s, tc.want)
				}
				for i, c := range list {
					want := tc.sessions[i].inflight
					if c == s {
						want++
					}
					if got := c.inflight.Load(); got != want {
						t.Fatalf("session %d: inflight %d, want %d", i, got, want)
					}
				}
			}
		})
	}
}

func TestPickLeastLoadedInPool(t *testing.T) {
	a, b, c := fakeSession("p", 8, 3), fakeSession("p", 8, 1), fakeSession("p", 8, 2)
	other := fakeSession("q", 8, 0)
	r := registryWith(a, b, c, other)
	got, err := r.pick(context.Background(), wanted{clientID: "p"}, nil, time.Second)
	if err != nil || got != b {
		t.Fatalf("pick = %v, %v; want the least loaded session of pool p", got, err)
	}
	// b and c now both have 2: either is fine, a and other are not.
	got, err = r.pick(context.Background(), wanted{clientID: "p"}, []*session{b}, time.Second)
	if err != nil || got != c {
		t.Fatalf("pick skipping b = %v, %v; want c", got, err)
	}
}

func TestPickAnySamplesAll(t *testing.T) {
	var list []*session
	for _, id := range []string{"a", "b", "c", "d", "e"} {
		list = append(list, fakeSession(id, 100, 0))
	}
	r := registryWith(list...)
	hits := map[*session]int{}
	for range 500 {
		s, err := r.pick(context.Background(), wanted{clientID: ""}, nil, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		hits[s]++
		r.release(s)
	}
	for _, s := range list {
		if hits[s] == 0 {
			t.Errorf("session of %s never picked in 500 tries: %v", s.clientID, hits)
		}
		if n := s.inflight.Load(); n != 0 {
			t.Errorf("session of %s: inflight %d after release", s.clientID, n)
		}
	}
}

// pickAsync runs pick in a goroutine; wait returns its result.
func pickAsync(r *registry, ctx context.Context, clientID string, timeout time.Duration) (wait func() (*session, error)) {
	type result struct {
		s   *session
		err error
	}
	done := make(chan result, 1)
	go func() {
		s, err := r.pick(ctx, wanted{clientID: clientID}, nil, timeout)
		done <- result{s, err}
	}()
	return func() (*session, error) {
		res := <-done
		return res.s, res.err
	}
}

func TestPickWakesOnAdd(t *testing.T) {
	for _, clientID := range []string{"late", ""} {
		r := newRegistry()
		wait := pickAsync(r, context.Background(), clientID, 10*time.Second)
		waitFor(t, "pick to wait", func() bool { return r.waiters.Load() == 1 })
		s := fakeSession("late", 1, 0)
		r.add(s)
		got, err := wait()
		if err != nil || got != s {
			t.Fatalf("clientID %q: pick = %v, %v; want the added session", clientID, got, err)
		}
		if got.inflight.Load() != 1 || r.waiters.Load() != 0 {
			t.Fatalf("inflight %d waiters %d, want 1 and 0", got.inflight.Load(), r.waiters.Load())
		}
	}
}

func TestPickIgnoresOtherPools(t *testing.T) {
	r := registryWith(fakeSession("other", 10, 0))
	_, err := r.pick(context.Background(), wanted{clientID: "mine"}, nil, 20*time.Millisecond)
	var e *httperr.Error
	if !errors.As(err, &e) || e.Status != http.StatusServiceUnavailable || e.Code != httperr.NoClient || !strings.Contains(e.Msg, `"mine"`) {
		t.Fatalf("err = %v, want 503 no_client naming the client", err)
	}
}

func TestReleaseWakesWaiter(t *testing.T) {
	s := fakeSession("c", 1, 1)
	r := registryWith(s)
	wait := pickAsync(r, context.Background(), "c", 10*time.Second)
	waitFor(t, "pick to wait", func() bool { return r.waiters.Load() == 1 })
	r.release(s)
	got, err := wait()
	if err != nil || got != s {
		t.Fatalf("pick = %v, %v; want the released session", got, err)
	}
	if n := s.inflight.Load(); n != 1 {
		t.Fatalf("inflight = %d, want 1", n)
	}
}

func TestPickTimeout(t *testing.T) {
	for _, tc := range []struct {
		name     string
		sessions []*session
		clientID string
		status   int
		code     string
	}{
		{"nothing connected", nil, "", http.StatusServiceUnavailable, httperr.NoClient},
		{"named client not connected", nil, "dc1", http.StatusServiceUnavailable, httperr.NoClient},
		{"all full", []*session{fakeSession("dc1", 2, 2), fakeSession("dc2", 1, 1), fakeSession("dc3", 1, 1)}, "", http.StatusGatewayTimeout, httperr.ClientBusy},
		{"pool full", []*session{fakeSession("dc1", 2, 2), fakeSession("dc2", 5, 0)}, "dc1", http.StatusGatewayTimeout, httperr.ClientBusy},
		{"all gone", []*session{fakeSession("dc1", 2, 0)}, "dc1", http.StatusServiceUnavailable, httperr.NoClient},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := registryWith(tc.sessions...)
			if tc.name == "all gone" {
				tc.sessions[0].gone.Store(true)
			}
			start := time.Now()
			s, err := r.pick(context.Background(), wanted{clientID: tc.clientID}, nil, 30*time.Millisecond)
			if s != nil {
				t.Fatalf("got a session")
			}
			var e *httperr.Error
			if !errors.As(err, &e) || e.Status != tc.status || e.Code != tc.code {
				t.Fatalf("err = %#v, want %d %s", err, tc.status, tc.code)
			}
			if d := time.Since(start); d < 30*time.Millisecond {
				t.Errorf("gave up after %v, before the timeout", d)
			}
			if r.waiters.Load() != 0 {
				t.Errorf("waiters = %d after the timeout", r.waiters.Load())
			}
		})
	}
}

func TestPickContextCanceled(t *testing.T) {
	r := newRegistry()
	ctx, cancel := context.WithCancel(context.Background())
	wait := pickAsync(r, ctx, "", time.Minute)
	waitFor(t, "pick to wait", func() bool { return r.waiters.Load() == 1 })
	cancel()
	if _, err := wait(); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if r.waiters.Load() != 0 {
		t.Fatalf("waiters = %d", r.waiters.Load())
	}
}

func TestRemove(t *testing.T) {
	a, b := fakeSession("p", 4, 0), fakeSession("p", 4, 3)
	r := registryWith(a, b)
	before := r.sessions()
	r.remove(a)
	if !a.gone.Load() {
		t.Error("removed session not marked gone")
	}
	if got := r.sessions(); len(got) != 1 || got[0] != b {
		t.Errorf("sessions = %v, want only b", got)
	}
	if len(before) != 2 {
		t.Errorf("a snapshot taken before remove changed: %v", before)
	}
	if s, err := r.pick(context.Background(), wanted{clientID: "p"}, nil, time.Second); err != nil || s != b {
		t.Errorf("pick = %v, %v; want b", s, err)
	}
	r.remove(b)
	if _, ok := r.pools["p"]; ok {
		t.Error("empty pool kept")
	}
	if s, err := r.pick(context.Background(), wanted{clientID: "p"}, nil, 10*time.Millisecond); s != nil || err == nil {
		t.Errorf("pick after all removed = %v, %v", s, err)
	}
}

func TestAcquireGone(t *testing.T) {
	s := fakeSession("c", 4, 0)
	s.gone.Store(true)
	if s.acquire() {
		t.Fatal("acquired a slot on a gone session")
	}
}

// Many requests picking and releasing at once never push a session past
// its limit, and leave nothing in flight.
func TestPickConcurrent(t *testing.T) {
	const maxStreams = 4
	list := []*session{fakeSession("p", maxStreams, 0), fakeSession("p", maxStreams, 0), fakeSession("p", maxStreams, 0)}
	r := registryWith(list...)
	var wg sync.WaitGroup
	for g := range 50 {
		clientID := "p"
		if g%2 == 0 {
			clientID = "" // the sampling path
		}
		wg.Go(func() {
			for range 200 {
				s, err := r.pick(context.Background(), wanted{clientID: clientID}, nil, 10*time.Second)
				if err != nil {
					t.Error(err)
					return
				}
				if n := s.inflight.Load(); n > maxStreams || n < 1 {
					t.Errorf("inflight %d, limit %d", n, maxStreams)
				}
				r.release(s)
			}
		})
	}
	wg.Wait()
	for i, s := range list {
		if n := s.inflight.Load(); n != 0 {
			t.Errorf("session %d: inflight %d at the end", i, n)
		}
	}
	if n := r.waiters.Load(); n != 0 {
		t.Errorf("waiters = %d at the end", n)
	}
}
