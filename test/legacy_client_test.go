package test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"wsp/internal/client"
	"wsp/internal/config"
	"wsp/internal/rules"
)

// New client, old server: a wsp client with legacy: true serving a
// root-gg/wsp server (oldServer, in legacy_peer_test.go).

func legacyClientConfig(s *oldServer, id string, idle, most int) config.Client {
	cfg := config.DefaultClient()
	cfg.ID = id
	cfg.Targets = []string{s.registerURL()}
	cfg.AllowAny = true
	cfg.Legacy = true
	cfg.SecretKey = s.secret
	cfg.PoolIdleSize = idle
	cfg.PoolMaxSize = most
	cfg.Drain = config.Duration(5 * time.Second)
	return cfg
}

// runLegacyClient runs a client until the test ends, without waiting for
// it to connect; log nil logs through t.
func runLegacyClient(t *testing.T, cfg config.Client, log *slog.Logger) *agent {
	t.Helper()
	if log == nil {
		log = testLogger(t, "client")
	}
	c, err := client.New(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &agent{c: c, cancel: cancel, done: make(chan struct{})}
	go func() { defer close(a.done); c.Run(ctx) }()
	t.Cleanup(a.stop)
	return a
}

// waitIdle waits until the old server holds exactly live connections, idle
// of them idle.
func waitIdle(t *testing.T, s *oldServer, live, idle int) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d connections, %d idle", live, idle), func() bool {
		l, i := s.counts()
		return l == live && i == idle
	})
}

// waitRefilled waits until at least idle connections are idle: the pool
// only grows (as the original's did), so a connection opened as a
// replacement stays once its request is done.
func waitRefilled(t *testing.T, s *oldServer, idle int) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d idle connections", idle), func() bool {
		_, i := s.counts()
		return i >= idle
	})
}

// survivors counts the connections of before still up.
func survivors(s *oldServer, before map[*oldConn]bool) int {
	n := 0
	for c := range s.liveConns() {
		if before[c] {
			n++
		}
	}
	return n
}

// oldRequest builds an app's request to dest through the old server.
func (s *oldServer) oldRequest(t *testing.T, method, dest string, body io.Reader) *http.Request {
	t.Helper()
	req, err := http.NewRequest(method, s.url+"/request", body)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-PROXY-DESTINATION", dest)
	return req
}

// capture is a logger whose output a test can read.
type capture struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (c *capture) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.Write(p)
}

func (c *capture) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}

func (c *capture) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(c, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// hold is a backend whose /hold requests wait until release is closed.
type hold struct {
	started atomic.Int64
	release chan struct{}
}

func (h *hold) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h.started.Add(1)
	select {
	case <-h.release:
	case <-time.After(20 * time.Second): // the test failed; do not hang
	}
	io.WriteString(w, "released "+r.URL.RawQuery)
}

// sendHolds sends n requests to the held backend through s; their errors
// (nil for a 200 with the right body) come on the channel.
func sendHolds(t *testing.T, s *oldServer, dest string, n int) <-chan error {
	errs := make(chan error, n)
	for i := range n {
		req := s.oldRequest(t, http.MethodGet, fmt.Sprintf("%s/hold?%d", dest, i), nil)
		go func() {
			resp, err := testHTTP.Do(req)
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusOK || string(b) != fmt.Sprintf("released %d", i) {
				err = fmt.Errorf("request %d: %d %q", i, resp.StatusCode, b)
			}
			errs <- err
		}()
	}
	return errs
}

func collect(t *testing.T, errs <-chan error, n int) {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for range n {
		select {
		case err := <-errs:
			if err != nil {
				t.Error(err)
			}
		case <-timeout:
			t.Fatal("requests did not finish")
		}
	}
}

func TestLegacyClientGetPost(t *testing.T) {
	big := make([]byte, 4<<20)
	rand.Read(big)
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Saw-Proxy-Header", r.Header.Get("X-Proxy-Destination"))
		switch r.URL.Path {
		case "/get":
			w.Write(big)
		case "/post":
			body, _ := io.ReadAll(r.Body)
			w.Header().Set("X-Method", r.Method)
			io.WriteString(w, sha(body))
		case "/redirect":
			http.Redirect(w, r, "/elsewhere", http.StatusFound)
		}
	}))
	s := startOldServer(t, "s3cret", 5*time.Second)
	a := runLegacyClient(t, legacyClientConfig(s, "legacy-1", 3, 10), nil)
	waitFor(t, "client ready", a.c.Ready)
	waitIdle(t, s, 3, 3)

	s.mu.Lock()
	if s.greetings[0] != "legacy-1_3" {
		t.Errorf("greeting %q, want legacy-1_3", s.greetings[0])
	}
	if h := s.headers[0]; h.Get("X-Secret-Key") != "s3cret" || h.Get("Sec-Websocket-Protocol") != "" {
		t.Errorf("upgrade headers: %v", h)
	}
	s.mu.Unlock()

	resp := do(t, s.oldRequest(t, http.MethodGet, b.URL+"/get", nil))
	got := []byte(readAll(t, resp.Body))
	if resp.StatusCode != http.StatusOK || sha(got) != sha(big) {
		t.Fatalf("GET: %d, %d bytes, want 200 and the 4 MiB body", resp.StatusCode, len(got))
	}
	if v := resp.Header.Get("X-Saw-Proxy-Header"); v != "" {
		t.Errorf("X-Proxy-Destination reached the backend: %q", v)
	}

	body := make([]byte, 8<<20)
	rand.Read(body)
	resp = do(t, s.oldRequest(t, http.MethodPost, b.URL+"/post", bytes.NewReader(body)))
	if got := readAll(t, resp.Body); resp.StatusCode != http.StatusOK || got != sha(body) || resp.Header.Get("X-Method") != "POST" {
		t.Fatalf("POST 8 MiB: %d %q, want 200 and %s", resp.StatusCode, got, sha(body))
	}

	resp = do(t, s.oldRequest(t, http.MethodGet, b.URL+"/redirect", nil))
	if resp.StatusCode != http.StatusFound || resp.Header.Get("Location") != "/elsewhere" {
		t.Errorf("redirect: %d %q, want 302 passed through", resp.StatusCode, resp.Header.Get("Location"))
	}
}

func TestLegacyClientConcurrent(t *testing.T) {
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "answer to "+r.URL.Query().Get("n"))
	}))
	s := startOldServer(t, "", 10*time.Second)
	a := runLegacyClient(t, legacyClientConfig(s, "legacy-c", 10, 50), nil)
	waitFor(t, "client ready", a.c.Ready)
	waitIdle(t, s, 10, 10)

	const n = 50
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for i := range n {
		req := s.oldRequest(t, http.MethodGet, fmt.Sprintf("%s/x?n=%d", b.URL, i), nil)
		wg.Go(func() {
			resp, err := testHTTP.Do(req)
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			got, _ := io.ReadAll(resp.Body)
			if want := fmt.Sprintf("answer to %d", i); resp.StatusCode != http.StatusOK || string(got) != want {
				errs <- fmt.Errorf("request %d: %d %q, want %q", i, resp.StatusCode, got, want)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if m := s.mostConns(); m > 50 {
		t.Errorf("%d connections at once, above poolmaxsize 50", m)
	}
}

func TestLegacyClientErrors(t *testing.T) {
	var secretSeen atomic.Bool
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/secret" {
			secretSeen.Store(true)
		}
		io.WriteString(w, "ok")
	}))
	closed := closedPort(t)
	s := startOldServer(t, "", 5*time.Second)
	cfg := legacyClientConfig(s, "legacy-r", 2, 4)
	cfg.AllowAny = false
	cfg.Whitelist = []rules.Spec{{URL: "^" + b.URL + "/ok"}, {URL: "^http://" + closed + "/"}}
	a := runLegacyClient(t, cfg, nil)
	waitFor(t, "client ready", a.c.Ready)

	waitIdle(t, s, 2, 2)
	before := s.liveConns()
	resp := do(t, s.oldRequest(t, http.MethodGet, b.URL+"/ok", nil))
	if got := readAll(t, resp.Body); resp.StatusCode != http.StatusOK || got != "ok" {
		t.Fatalf("allowed: %d %q", resp.StatusCode, got)
	}
	for _, c := range []struct {
		dest, code string
		status     int
	}{
		{b.URL + "/secret", "client_refused", http.StatusForbidden},
		{"http://" + closed + "/", "dial_failed", http.StatusBadGateway},
	} {
		resp := do(t, s.oldRequest(t, http.MethodGet, c.dest, nil))
		body := readAll(t, resp.Body)
		if resp.StatusCode != c.status || resp.Header.Get("X-Wsp-Error") != c.code || !strings.Contains(body, "legacy-r") || strings.Count(body, "\n") != 1 {
			t.Errorf("%s: %d %s %q, want %d %s and a one-line body naming the client", c.dest, resp.StatusCode, resp.Header.Get("X-Wsp-Error"), body, c.status, c.code)
		}
	}
	if secretSeen.Load() {
		t.Error("a refused request reached the backend")
	}
	// Failures are answers, not broken connections: the pool is intact.
	if n := survivors(s, before); n != 2 {
		t.Errorf("%d of the 2 first connections left after failed requests, want both", n)
	}
	waitRefilled(t, s, 2)
}

func TestLegacyClientPoolSize(t *testing.T) {
	h := &hold{release: make(chan struct{})}
	b := backend(t, h)
	s := startOldServer(t, "", 15*time.Second)
	a := runLegacyClient(t, legacyClientConfig(s, "legacy-p", 4, 6), nil)
	waitFor(t, "client ready", a.c.Ready)
	waitIdle(t, s, 4, 4)
	// Exactly poolidlesize, over more than one of the client's checks.
	for end := time.Now().Add(1500 * time.Millisecond); time.Now().Before(end); {
		if l, i := s.counts(); l != 4 || i != 4 {
			t.Fatalf("idle pool: %d connections, %d idle, want exactly 4 and 4", l, i)
		}
		<-time.After(20 * time.Millisecond)
	}

	// A burst of long requests: the pool grows to poolmaxsize, no further;
	// the requests beyond wait at the old server.
	errs := sendHolds(t, s, b.URL, 10)
	waitFor(t, "6 requests at the backend", func() bool { return h.started.Load() == 6 })
	waitIdle(t, s, 6, 0)
	for end := time.Now().Add(1500 * time.Millisecond); time.Now().Before(end); {
		if l, _ := s.counts(); l > 6 {
			t.Fatalf("%d connections under load, above poolmaxsize 6", l)
		}
		<-time.After(20 * time.Millisecond)
	}
	if n := h.started.Load(); n != 6 {
		t.Fatalf("%d requests at the backend, want 6 (one per connection)", n)
	}
	close(h.release)
	collect(t, errs, 10)
	if m := s.mostConns(); m > 6 {
		t.Errorf("%d connections at once, above poolmaxsize 6", m)
	}
}

func TestLegacyClientPoolRefill(t *testing.T) {
	h := &hold{release: make(chan struct{})}
	b := backend(t, h)
	s := startOldServer(t, "", 15*time.Second)
	a := runLegacyClient(t, legacyClientConfig(s, "legacy-f", 2, 10), nil)
	waitFor(t, "client ready", a.c.Ready)
	waitIdle(t, s, 2, 2)
	// Each request that starts takes an idle connection; the client opens
	// a replacement, so poolidlesize stay idle.
	var all []<-chan error
	for n := 1; n <= 3; n++ {
		all = append(all, sendHolds(t, s, b.URL, 1))
		waitFor(t, fmt.Sprintf("%d requests at the backend", n), func() bool { return h.started.Load() == int64(n) })
		waitIdle(t, s, 2+n, 2)
	}
	close(h.release)
	for _, errs := range all {
		collect(t, errs, 1)
	}
	// Connections that served go back to idle; none is closed.
	waitIdle(t, s, 5, 5)
}

func TestLegacyClientWrongSecret(t *testing.T) {
	s := startOldServer(t, "right", 5*time.Second)
	cfg := legacyClientConfig(s, "legacy-w", 2, 4)
	cfg.SecretKey = "wrong"
	logs := &capture{}
	a := runLegacyClient(t, cfg, logs.logger())
	waitFor(t, "three refused attempts", func() bool { return s.rejections() >= 3 })
	if a.c.Ready() {
		t.Error("ready without a connection")
	}
	a.stop()
	out := logs.String()
	if !strings.Contains(out, "526") || !strings.Contains(out, "Invalid X-SECRET-KEY") {
		t.Errorf("the refusal is not logged with its status and text:\n%s", out)
	}
	if n := strings.Count(out, "cannot connect"); n != 1 {
		t.Errorf("%d lines for one cause, want 1:\n%s", n, out)
	}
	if strings.Contains(out, "wrong") {
		t.Errorf("the secret was logged:\n%s", out)
	}
}

func TestLegacyClientOutOfOrder(t *testing.T) {
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	s := startOldServer(t, "", 5*time.Second)
	logs := &capture{}
	a := runLegacyClient(t, legacyClientConfig(s, "legacy-o", 3, 5), logs.logger())
	waitFor(t, "client ready", a.c.Ready)
	waitIdle(t, s, 3, 3)

	for _, bad := range []struct {
		name string
		typ  int
		msg  string
	}{
		{"binary first", websocket.BinaryMessage, "junk"},
		{"bad JSON", websocket.TextMessage, `{"Method":"GET","URL":`},
		{"head without URL", websocket.TextMessage, `{"Method":"GET"}`},
	} {
		before := s.liveConns()
		c := s.takeIdle()
		c.ws.WriteMessage(bad.typ, []byte(bad.msg))
		select {
		case <-c.done:
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: the client kept the connection", bad.name)
		}
		now := s.liveConns()
		for other := range before {
			if other != c && !now[other] {
				t.Fatalf("%s: another connection was closed too", bad.name)
			}
		}
		waitRefilled(t, s, 3) // refilled (a request's replacement may have made it 4)
		resp := do(t, s.oldRequest(t, http.MethodGet, b.URL+"/", nil))
		if got := readAll(t, resp.Body); resp.StatusCode != http.StatusOK || got != "ok" {
			t.Fatalf("%s: then a request: %d %q", bad.name, resp.StatusCode, got)
		}
	}
	if n := strings.Count(logs.String(), "broke the legacy protocol"); n != 3 {
		t.Errorf("%d protocol violations logged, want 3:\n%s", n, logs.String())
	}
	if !a.c.Ready() {
		t.Error("not ready after violations on single connections")
	}
}

func TestLegacyClientMessageLimit(t *testing.T) {
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write(make([]byte, 100<<10))
	}))
	s := startOldServer(t, "", 5*time.Second)
	logs := &capture{}
	cfg := legacyClientConfig(s, "legacy-m", 2, 4)
	cfg.MaxMessageBytes = 64 << 10
	a := runLegacyClient(t, cfg, logs.logger())
	waitFor(t, "client ready", a.c.Ready)
	waitIdle(t, s, 2, 2)

	// An answer beyond the limit is an error, not a truncated body.
	before := s.liveConns()
	resp := do(t, s.oldRequest(t, http.MethodGet, b.URL+"/", nil))
	if body := readAll(t, resp.Body); resp.StatusCode != http.StatusBadGateway || resp.Header.Get("X-Wsp-Error") != "destination_broken" || !strings.Contains(body, "maxmessagebytes") {
		t.Errorf("answer too large: %d %s %q, want 502 destination_broken", resp.StatusCode, resp.Header.Get("X-Wsp-Error"), body)
	}
	if n := survivors(s, before); n != 2 {
		t.Errorf("%d of 2 connections left after an answer too large, want both", n)
	}
	waitRefilled(t, s, 2)
	before = s.liveConns()

	// A request body beyond the limit ends that connection; the old
	// server fails that request, the pool refills.
	resp = do(t, s.oldRequest(t, http.MethodPost, b.URL+"/", bytes.NewReader(make([]byte, 100<<10))))
	readAll(t, resp.Body)
	if resp.StatusCode != 526 {
		t.Errorf("request too large: %d, want the old server's 526", resp.StatusCode)
	}
	waitFor(t, "the connection that got it closed", func() bool { return survivors(s, before) == len(before)-1 })
	waitRefilled(t, s, 2)
	waitFor(t, "the oversize message logged", func() bool { return strings.Contains(logs.String(), "larger than maxmessagebytes") })
}

func TestLegacyClientDrain(t *testing.T) {
	h := &hold{release: make(chan struct{})}
	b := backend(t, h)
	s := startOldServer(t, "", 5*time.Second)
	a := runLegacyClient(t, legacyClientConfig(s, "legacy-d", 2, 4), nil)
	waitFor(t, "client ready", a.c.Ready)
	waitIdle(t, s, 2, 2)
	errs := sendHolds(t, s, b.URL, 1)
	waitFor(t, "the request at the backend", func() bool { return h.started.Load() == 1 })
	waitIdle(t, s, 3, 2)

	a.cancel()
	// Idle connections close at once; the busy one finishes its request.
	waitIdle(t, s, 1, 0)
	close(h.release)
	collect(t, errs, 1)
	select {
	case <-a.done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after the drain")
	}
	waitIdle(t, s, 0, 0)
	if a.c.Ready() {
		t.Error("ready after shutdown")
	}
}

func TestLegacyClientKeepAlive(t *testing.T) {
	s := startOldServer(t, "", 5*time.Second)
	cfg := legacyClientConfig(s, "legacy-k", 2, 4)
	cfg.KeepAlive = config.Duration(100 * time.Millisecond)
	a := runLegacyClient(t, cfg, nil)
	waitFor(t, "client ready", a.c.Ready)
	waitIdle(t, s, 2, 2)

	// A server that answers pings keeps its connections, however long
	// they stay idle.
	before := s.liveConns()
	for end := time.Now().Add(time.Second); time.Now().Before(end); {
		if n := survivors(s, before); n != 2 {
			t.Fatalf("%d of 2 pinged connections left, want both", n)
		}
		<-time.After(20 * time.Millisecond)
	}

	// One that stops answering is taken for gone after two intervals:
	// its connections are replaced.
	s.noPong.Store(true)
	for c := range before {
		c.ws.Close() // the pool refills with connections that ignore pings
	}
	waitFor(t, "the first connections replaced", func() bool { return survivors(s, before) == 0 })
	s.mu.Lock()
	opened := len(s.greetings)
	s.mu.Unlock()
	waitFor(t, "silent connections replaced in turn", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.greetings) >= opened+4
	})
}
