package cluster

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"wsp/internal/cluster/redistest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// ids is a node's set of held client ids, changed by the test.
type ids struct {
	mu  sync.Mutex
	set []string
}

func (h *ids) get() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.set)
}

func (h *ids) put(list ...string) {
	h.mu.Lock()
	h.set = list
	h.mu.Unlock()
}

// syncBuffer is a log destination safe for concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// node makes a directory for node name on rs, closed when the test ends.
func node(t *testing.T, redisURL, name string, ttl time.Duration, held *ids, now func() time.Time) *Directory {
	t.Helper()
	d, err := New(Config{
		Redis: redisURL, Node: name, Advertise: "http://" + name + ".test:8080", TTL: ttl,
		Held: held.get, Now: now,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func raw(t testing.TB, rs *redistest.Server) *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: rs.Addr(), Protocol: 2, DisableIdentity: true})
	t.Cleanup(func() { c.Close() })
	return c
}

// poll waits up to limit for cond, and fails the test naming what.
func poll(t *testing.T, limit time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > limit {
			t.Fatalf("timed out after %s waiting for %s", limit, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}

func holderNames(t *testing.T, d *Directory, id string) []string {
	t.Helper()
	nodes, err := d.Holders(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, n := range nodes {
		names = append(names, n.Name+"="+n.URL)
	}
	slices.Sort(names)
	return names
}

func TestHeartbeatRecordsAndRemovesHeldIDs(t *testing.T) {
	rs := redistest.Start(t)
	// A long TTL: every change below must show at once, not at the next
	// heartbeat ten seconds later.
	ttl := 30 * time.Second
	heldA, heldB := &ids{}, &ids{}
	heldA.put("dc1", "dc2")
	a := node(t, rs.URL(), "a", ttl, heldA, nil)
	b := node(t, rs.URL(), "b", ttl, heldB, nil)
	a.Start()
	poll(t, 5*time.Second, "a's first heartbeat", func() bool { return len(holderNames(t, b, "dc1")) == 1 })
	if got := holderNames(t, b, "dc2"); !slices.Equal(got, []string{"a=http://a.test:8080"}) {
		t.Fatalf("holders of dc2 seen from b: %v", got)
	}
	if got := holderNames(t, a, "dc1"); len(got) != 0 {
		t.Fatalf("a must not list itself as a holder: %v", got)
	}

	// The data model: a sorted set per id, scored with the expiry, whose
	// key expires too; the node hash with its URL and count.
	rc := raw(t, rs)
	ctx := context.Background()
	score, err := rc.ZScore(ctx, "wsp:client:dc1", "a").Result()
	if err != nil {
		t.Fatal(err)
	}
	if left := time.Until(time.UnixMilli(int64(score))); left <= 0 || left > ttl {
		t.Fatalf("entry expires in %s, want within (0, %s]", left, ttl)
	}
	if pttl := rc.PTTL(ctx, "wsp:client:dc1").Val(); pttl <= 0 || pttl > ttl {
		t.Fatalf("key TTL %s, want within (0, %s]", pttl, ttl)
	}
	if h := rc.HGetAll(ctx, "wsp:node:a").Val(); h["url"] != "http://a.test:8080" || h["clients"] != "2" {
		t.Fatalf("node hash: %v", h)
	}

	// Gaining an id and losing one show at once.
	heldA.put("dc2", "dc3")
	a.Changed()
	d := poll(t, 5*time.Second, "dc3 recorded and dc1 removed", func() bool {
		return len(holderNames(t, b, "dc3")) == 1 && len(holderNames(t, b, "dc1")) == 0
	})
	if d > a.Period() {
		t.Fatalf("a change took %s to show, longer than a heartbeat period (%s)", d, a.Period())
	}
	t.Logf("a change showed in the directory after %s", d)

	// Two holders of one id.
	heldB.put("dc2")
	b.Start()
	c := node(t, rs.URL(), "c", ttl, &ids{}, nil)
	poll(t, 5*time.Second, "b holding dc2", func() bool {
		return slices.Equal(holderNames(t, c, "dc2"), []string{"a=http://a.test:8080", "b=http://b.test:8080"})
	})
	b.Start() // a second Start is a no-op
	b.Changed()
	poll(t, 5*time.Second, "b's node list", func() bool {
		b.Changed()
		st := b.Status()
		return st.Up && st.Held == 1 && len(st.Nodes) == 2
	})
}

// TestEntriesExpire: a node that stops heartbeating (killed) is no longer
// a holder once its TTL has passed, as seen by any node's clock.
func TestEntriesExpire(t *testing.T) {
	rs := redistest.Start(t)
	ttl := 2 * time.Second
	held := &ids{}
	held.put("dc1")
	a := node(t, rs.URL(), "a", ttl, held, nil)
	a.Start()
	now := time.Now()
	b := node(t, rs.URL(), "b", ttl, &ids{}, nil)
	poll(t, 5*time.Second, "a's heartbeat", func() bool { return len(holderNames(t, b, "dc1")) == 1 })
	a.Close() // no withdraw: as if killed

	later := node(t, rs.URL(), "b", ttl, &ids{}, func() time.Time { return now.Add(ttl + 2*time.Second) })
	if got := holderNames(t, later, "dc1"); len(got) != 0 {
		t.Fatalf("after the TTL, holders of dc1: %v", got)
	}
	// And for real: the keys go too.
	rc := raw(t, rs)
	waited := poll(t, 3*ttl, "a's keys to expire", func() bool {
		return rc.Exists(context.Background(), "wsp:client:dc1", "wsp:node:a").Val() == 0
	})
	if got := holderNames(t, b, "dc1"); len(got) != 0 {
		t.Fatalf("after expiry, holders of dc1: %v", got)
	}
	t.Logf("keys expired %s after the last heartbeat could have been", waited)
}

// TestWithdrawRemovesEverythingAtOnce: a drain removes the node's entries
// first thing, with no wait for the TTL, and stops the heartbeats.
func TestWithdrawRemovesEverythingAtOnce(t *testing.T) {
	rs := redistest.Start(t)
	ttl := 30 * time.Second
	held := &ids{}
	held.put("dc1", "dc2")
	a := node(t, rs.URL(), "a", ttl, held, nil)
	a.Start()
	b := node(t, rs.URL(), "b", ttl, &ids{}, nil)
	poll(t, 5*time.Second, "a's heartbeat", func() bool { return len(holderNames(t, b, "dc2")) == 1 })
	if err := a.Withdraw(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"dc1", "dc2"} {
		if got := holderNames(t, b, id); len(got) != 0 {
			t.Fatalf("after withdraw, holders of %s: %v", id, got)
		}
	}
	rc := raw(t, rs)
	ctx := context.Background()
	if n := rc.Exists(ctx, "wsp:node:a", "wsp:client:dc1", "wsp:client:dc2").Val(); n != 0 {
		t.Fatalf("%d keys of node a left after withdraw", n)
	}
	// No heartbeat runs any more to re-add them.
	a.runMu.Lock()
	running, done := a.cancel != nil, a.done
	a.runMu.Unlock()
	select {
	case <-done:
	default:
		running = true
	}
	if running {
		t.Fatal("the heartbeats go on after withdraw")
	}
	if !a.Status().Withdrawn {
		t.Fatal("status does not say withdrawn")
	}
}

// TestRebuildAfterRedisRestart: Redis restarts empty; the next heartbeats
// record everything again.
func TestRebuildAfterRedisRestart(t *testing.T) {
	rs := redistest.Start(t)
	ttl := time.Second
	held := &ids{}
	held.put("dc1", "dc2", "dc3")
	a := node(t, rs.URL(), "a", ttl, held, nil)
	a.Start()
	b := node(t, rs.URL(), "b", ttl, &ids{}, nil)
	poll(t, 5*time.Second, "a's heartbeat", func() bool { return len(holderNames(t, b, "dc3")) == 1 })
	rs.Restart()
	took := poll(t, 10*time.Second, "the directory rebuilt after the restart", func() bool {
		for _, id := range []string{"dc1", "dc2", "dc3"} {
			nodes, err := b.Holders(context.Background(), id)
			if err != nil || len(nodes) != 1 {
				return false
			}
		}
		return true
	})
	t.Logf("rebuilt %s after Redis came back (heartbeat period %s)", took, a.Period())
}

// TestRedisDown: lookups fail within their bound with an error naming the
// client and the directory; the heartbeat keeps retrying and logs the cause
// once, not once per attempt; it recovers when Redis comes.
func TestRedisDown(t *testing.T) {
	rs := redistest.Start(t)
	rs.Stop()
	var logs syncBuffer
	held := &ids{}
	held.put("dc1")
	d, err := New(Config{
		Redis: rs.URL(), Node: "a", Advertise: "http://a.test:8080", TTL: time.Second,
		Held: held.get, Log: slog.New(slog.NewTextHandler(&logs, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	d.Start()
	start := time.Now()
	_, err = d.Holders(context.Background(), "dc9")
	if err == nil {
		t.Fatal("lookup with Redis down succeeded")
	}
	if took := time.Since(start); took > LookupTimeout+500*time.Millisecond {
		t.Fatalf("lookup took %s with Redis down, want at most about %s", took, LookupTimeout)
	}
	if msg := err.Error(); !strings.Contains(msg, `"dc9"`) || !strings.Contains(msg, rs.Addr()) {
		t.Fatalf("error does not name the client and the directory: %s", msg)
	}
	poll(t, 5*time.Second, "several failed heartbeats", func() bool { return d.Errors() >= 5 })
	if st := d.Status(); st.Up || st.Error == "" {
		t.Fatalf("status with Redis down: %+v", st)
	}
	if n := strings.Count(logs.String(), "cluster directory unreachable"); n != 1 {
		t.Fatalf("logged the failure %d times, want once:\n%s", n, logs.String())
	}
	rs.Restart()
	b := node(t, rs.URL(), "b", time.Second, &ids{}, nil)
	poll(t, 10*time.Second, "recovery", func() bool {
		nodes, err := b.Holders(context.Background(), "dc1")
		return err == nil && len(nodes) == 1 && d.Up()
	})
	if !strings.Contains(logs.String(), "cluster directory reachable again") {
		t.Fatalf("recovery not logged:\n%s", logs.String())
	}
}

func TestNodesWithClients(t *testing.T) {
	rs := redistest.Start(t)
	ttl := 30 * time.Second
	full, empty := &ids{}, &ids{}
	full.put("dc1")
	a := node(t, rs.URL(), "a", ttl, full, nil)
	c := node(t, rs.URL(), "c", ttl, empty, nil)
	a.Start()
	c.Start()
	b := node(t, rs.URL(), "b", ttl, &ids{}, nil)
	poll(t, 5*time.Second, "a and c heartbeats", func() bool {
		nodes, err := b.liveNodes(context.Background(), time.Now())
		return err == nil && len(nodes) == 2
	})
	var skew atomic.Int64 // b's clock, ahead by this
	b.cfg.Now = func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	b.Start() // its first heartbeat reads the node list
	poll(t, 5*time.Second, "b's node list", func() bool {
		got := b.NodesWithClients()
		return len(got) == 1 && got[0].Name == "a" && got[0].URL == "http://a.test:8080" && got[0].Clients == 1
	})
	// A list older than the ttl (Redis down since) may name nodes gone.
	skew.Store(int64(ttl + time.Second))
	if got := b.NodesWithClients(); len(got) != 0 {
		t.Fatalf("a node list older than the ttl is still used: %v", got)
	}
}

// TestDrainingHolders: a draining node is a holder only for the ids no
// other node holds, and says so at every heartbeat, until it withdraws.
func TestDrainingHolders(t *testing.T) {
	rs := redistest.Start(t)
	ttl := 3 * time.Second // a heartbeat every second
	heldA, heldB := &ids{}, &ids{}
	heldA.put("dc1", "dc2")
	heldB.put("dc2")
	a := node(t, rs.URL(), "a", ttl, heldA, nil)
	b := node(t, rs.URL(), "b", ttl, heldB, nil)
	c := node(t, rs.URL(), "c", ttl, &ids{}, nil)
	a.Start()
	b.Start()
	poll(t, 5*time.Second, "both holders of dc2", func() bool { return len(holderNames(t, c, "dc2")) == 2 })
	if err := a.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	check := func(when string) {
		t.Helper()
		if got := holderNames(t, c, "dc1"); !slices.Equal(got, []string{"a=http://a.test:8080"}) {
			t.Fatalf("%s: holders of dc1, held by a only: %v", when, got)
		}
		if got := holderNames(t, c, "dc2"); !slices.Equal(got, []string{"b=http://b.test:8080"}) {
			t.Fatalf("%s: holders of dc2, held by a (draining) and b: %v", when, got)
		}
	}
	check("right after Drain")
	if !a.Status().Draining {
		t.Fatal("status does not say draining")
	}
	beat := a.Status().LastHeartbeat
	poll(t, 5*time.Second, "a's next full heartbeat", func() bool {
		st := a.Status()
		return st.LastHeartbeat.After(beat) && len(st.Nodes) == 2 && st.Nodes[0].Draining != st.Nodes[1].Draining
	})
	check("after a heartbeat")
	c.Start()
	poll(t, 5*time.Second, "c's node list", func() bool {
		got := c.NodesWithClients()
		return len(got) == 1 && got[0].Name == "b"
	})
	if err := a.Withdraw(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := holderNames(t, c, "dc1"); len(got) != 0 {
		t.Fatalf("after withdraw, holders of dc1: %v", got)
	}
}

// TestWithdrawIsBounded: a heartbeat stuck on a Redis that never answers
// does not hold Withdraw past its deadline.
func TestWithdrawIsBounded(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var accepted atomic.Int64
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			wg.Go(func() {
				defer c.Close()
				io.Copy(io.Discard, c) // reads, never answers
			})
		}
	})
	defer func() {
		ln.Close()
		wg.Wait()
	}()
	held := &ids{}
	held.put("dc1")
	d, err := New(Config{Redis: "redis://" + ln.Addr().String() + "/0", Node: "a", Advertise: "http://a.test:8080", TTL: 30 * time.Second, Held: held.get})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close() // waits for the heartbeat, which ends the connections
	d.Start()
	poll(t, 5*time.Second, "the first heartbeat to be under way", func() bool { return accepted.Load() > 0 })
	const bound = 300 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	start := time.Now()
	if err := d.Withdraw(ctx); err == nil {
		t.Fatal("withdraw from a Redis that never answers succeeded")
	}
	if took := time.Since(start); took > bound+200*time.Millisecond {
		t.Fatalf("withdraw took %s, bounded by %s", took, bound)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	held := func() []string { return nil }
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{Redis: "http://x", Node: "a", Advertise: "http://a", TTL: time.Second, Held: held}, "cluster.redis"},
		{Config{Redis: "redis://x:1", Advertise: "http://a", TTL: time.Second, Held: held}, "node name"},
		{Config{Redis: "redis://x:1", Node: "a", TTL: time.Second, Held: held}, "cluster.advertise"},
		{Config{Redis: "redis://x:1", Node: "a", Advertise: "http://a", TTL: time.Millisecond, Held: held}, "cluster.ttl"},
	} {
		if _, err := New(tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) = %v, want an error naming %s", tc.cfg, err, tc.want)
		}
	}
	d, err := New(Config{Redis: "redis://user:hunter2@x:1/0", Node: "a", Advertise: "http://a", TTL: time.Second, Held: held})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if st := d.Status(); strings.Contains(st.Redis, "hunter2") {
		t.Fatalf("status shows the Redis password: %s", st.Redis)
	}
}

// BenchmarkHeartbeat measures a full heartbeat of a node holding 10,000
// client ids, and the Redis memory the directory takes per id.
func BenchmarkHeartbeat(b *testing.B) {
	rs := redistest.Start(b)
	const n = 10_000
	held := &ids{}
	list := make([]string, n)
	for i := range list {
		list[i] = fmt.Sprintf("client-%05d", i)
	}
	held.put(list...)
	d, err := New(Config{Redis: rs.URL(), Node: "a", Advertise: "http://a.test:8080", TTL: time.Minute, Held: held.get})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	rc := raw(b, rs)
	ctx := context.Background()
	usedMemory := func() int64 {
		info := rc.Info(ctx, "memory").Val()
		for _, line := range strings.Split(info, "\r\n") {
			if v, ok := strings.CutPrefix(line, "used_memory:"); ok {
				m, _ := strconv.ParseInt(v, 10, 64)
				return m
			}
		}
		b.Fatal("no used_memory in INFO")
		return 0
	}
	before := usedMemory()
	b.ResetTimer()
	for range b.N {
		if _, err := d.sync(ctx, true); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(usedMemory()-before)/n, "redis-bytes/id")
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/n, "µs/id")
}
