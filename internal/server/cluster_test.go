package server

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"wsp/internal/cluster/redistest"
	"wsp/internal/config"
	"wsp/internal/httperr"
)

// clusterServer is a Server with a Redis directory that is never reached
// (nothing listens on port 1): these tests must not need it.
func clusterServer(t *testing.T, logs *bytes.Buffer) *Server {
	t.Helper()
	cfg := config.DefaultServer()
	cfg.Timeout = config.Duration(20 * time.Millisecond)
	cfg.Cluster = config.Cluster{Node: "node-a", Redis: "redis://127.0.0.1:1/0", Advertise: "http://127.0.0.1:8080", Secret: "s3cret-value", TTL: config.Duration(15 * time.Second)}
	log := slog.New(slog.DiscardHandler)
	if logs != nil {
		log = slog.New(slog.NewTextHandler(logs, nil))
	}
	s, err := New(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.closeCluster)
	return s
}

func TestFromNode(t *testing.T) {
	var logs bytes.Buffer
	s := clusterServer(t, &logs)
	plain, err := New(config.DefaultServer(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().Unix()
	// sign is a node's signature of a GET /request for dc1 of
	// http://api.internal/x, request id req-1.
	sign := func(secret string, at int64, node string) string {
		return fmt.Sprintf("t=%d,mac=%s", at, nodeMAC(secret, at, node, "GET", "http://api.internal/x", "dc1", "req-1"))
	}
	good := sign("s3cret-value", now, "node-b")
	for _, tc := range []struct {
		name       string
		srv        *Server
		node, auth string
		tamper     func(r *http.Request) // after signing
		want       string                // the node name accepted
		status     int
		code       string
	}{
		{"an app's request", s, "", "", nil, "", 0, ""},
		{"signed with the secret", s, "node-b", good, nil, "node-b", 0, ""},
		{"signed a while ago, within the window", s, "node-b", sign("s3cret-value", now-50, "node-b"), nil, "node-b", 0, ""},
		{"no signature", s, "node-b", "", nil, "", 401, httperr.Unauthorized},
		{"signed with another secret", s, "node-b", sign("s3cret-valuX", now, "node-b"), nil, "", 403, httperr.Forbidden},
		{"signed by another node", s, "node-b", sign("s3cret-value", now, "node-c"), nil, "", 403, httperr.Forbidden},
		{"signed too long ago (a replay)", s, "node-b", sign("s3cret-value", now-120, "node-b"), nil, "", 403, httperr.Forbidden},
		{"another destination than signed", s, "node-b", good, func(r *http.Request) { r.Header.Set(headerDestination, "http://169.254.169.254/") }, "", 403, httperr.Forbidden},
		{"another client than signed", s, "node-b", good, func(r *http.Request) { r.Header.Set(headerClient, "dc2") }, "", 403, httperr.Forbidden},
		{"another method than signed", s, "node-b", good, func(r *http.Request) { r.Method = "DELETE" }, "", 403, httperr.Forbidden},
		{"a malformed signature", s, "node-b", "s3cret-value", nil, "", 400, httperr.BadRequest},
		{"a signature and no node name", s, "", good, nil, "", 400, httperr.BadRequest},
		{"an invalid node name", s, "node b\x7f", good, nil, "", 400, httperr.BadRequest},
		{"a server without a cluster", plain, "node-b", good, nil, "", 403, httperr.Forbidden},
	} {
		r := httptest.NewRequest("GET", "/request", nil)
		r.Header.Set(headerDestination, "http://api.internal/x")
		r.Header.Set(headerClient, "dc1")
		r.Header.Set(headerRequestID, "req-1")
		if tc.node != "" {
			r.Header.Set(headerClusterNode, tc.node)
		}
		if tc.auth != "" {
			r.Header.Set(headerClusterAuth, tc.auth)
		}
		if tc.tamper != nil {
			tc.tamper(r)
		}
		got, e := tc.srv.fromNode(r)
		switch {
		case tc.status == 0 && (e != nil || got != tc.want):
			t.Errorf("%s: got %q, %v; want %q accepted", tc.name, got, e, tc.want)
		case tc.status != 0 && (e == nil || e.Status != tc.status || e.Code != tc.code || got != ""):
			t.Errorf("%s: got %q, %v; want %d %s", tc.name, got, e, tc.status, tc.code)
		}
		if e != nil && strings.Contains(e.Error(), "s3cret") {
			t.Errorf("%s: the refusal names the secret: %s", tc.name, e)
		}
		if r.Header.Get(headerClusterNode) != "" || r.Header.Get(headerClusterAuth) != "" {
			t.Errorf("%s: cluster headers left on the request", tc.name)
		}
	}
	// A CONNECT's signature covers its target.
	connect := func(target string) *http.Request {
		r := httptest.NewRequest("CONNECT", "http://"+target, nil)
		r.Host = target
		r.Header.Set(headerRequestID, "req-2")
		return r
	}
	r := connect("db.internal:5432")
	s.signNode(r.Header, "CONNECT", "db.internal:5432")
	if got, e := s.fromNode(r); got != s.node || e != nil {
		t.Errorf("a signed CONNECT: got %q, %v", got, e)
	}
	r2 := connect("db.internal:22")
	s.signNode(r2.Header, "CONNECT", "db.internal:5432")
	if _, e := s.fromNode(r2); e == nil || e.Status != 403 {
		t.Errorf("a CONNECT to another target than signed: %v, want 403", e)
	}
	// Cluster headers whose first value is empty are an app's, and go too.
	r = httptest.NewRequest("GET", "/request", nil)
	r.Header[headerClusterNode] = []string{"", "node-b"}
	r.Header[headerClusterAuth] = []string{"", "guess"}
	if got, e := s.fromNode(r); got != "" || e != nil || len(r.Header[headerClusterNode]) != 0 || len(r.Header[headerClusterAuth]) != 0 {
		t.Errorf("empty first values: got %q, %v, headers left: %v", got, e, r.Header)
	}
	if strings.Contains(logs.String(), "s3cret") {
		t.Fatalf("a secret was logged:\n%s", logs.String())
	}
	if n := strings.Count(logs.String(), "node request refused"); n != 11 {
		t.Fatalf("%d refusals logged, want 11 (the server without a cluster logs elsewhere):\n%s", n, logs.String())
	}
}

// TestNodeRequestIsNeverForwarded: a node request for a client this node
// does not hold is answered here: the directory is not even asked (it is
// unreachable here; asking would show in the message), so no loop can form.
func TestNodeRequestIsNeverForwarded(t *testing.T) {
	s := clusterServer(t, nil)
	for _, tc := range []struct {
		name string
		node string
		want string
	}{
		{"from a node", "node-b", `no client with id "dc1" is connected` + "\n"},
		{"from an app", "", `no client with id "dc1" is connected to this node, and the cluster directory could not be asked about the others`},
	} {
		r := httptest.NewRequest("GET", "/request", nil)
		r.Header.Set(headerDestination, "http://api.internal/x")
		r.Header.Set(headerClient, "dc1")
		if tc.node != "" {
			at := time.Now().Unix()
			r.Header.Set(headerClusterNode, tc.node)
			r.Header.Set(headerClusterAuth, fmt.Sprintf("t=%d,mac=%s", at, nodeMAC("s3cret-value", at, tc.node, "GET", "http://api.internal/x", "dc1", "")))
		}
		w := httptest.NewRecorder()
		s.ServeHTTP(w, r)
		if w.Code != http.StatusServiceUnavailable || w.Header().Get(httperr.Header) != httperr.NoClient || !strings.Contains(w.Body.String(), tc.want) {
			t.Errorf("%s: %d %s %q, want 503 no_client with %q", tc.name, w.Code, w.Header().Get(httperr.Header), w.Body.String(), tc.want)
		}
		if v := w.Header().Get("Via"); v != "" {
			t.Errorf("%s: answered with Via %q: it was forwarded", tc.name, v)
		}
		// A node's own answer to a node request says so; an app's does not.
		if mark, want := w.Header().Get(headerClusterNode), map[bool]string{true: "node-a"}[tc.node != ""]; mark != want {
			t.Errorf("%s: answered with %s %q, want %q", tc.name, headerClusterNode, mark, want)
		}
	}
	if got := s.cluster.forwarded.Load(); got != 0 {
		t.Fatalf("%d requests forwarded", got)
	}
}

// forwardingNode serves a cluster node with a real Redis directory in
// which the test writes the holders itself: fake nodes whose behaviour it
// controls. adjust may change the server before it serves.
func forwardingNode(t *testing.T, adjust func(*Server)) (base string, s *Server, rc *redis.Client) {
	t.Helper()
	rs := redistest.Start(t)
	cfg := config.DefaultServer()
	cfg.Timeout = config.Duration(50 * time.Millisecond)
	cfg.Drain = config.Duration(time.Second)
	cfg.Cluster = config.Cluster{Node: "node-a", Redis: rs.URL(), Advertise: "http://127.0.0.1:1", Secret: "s3cret-value", TTL: config.Duration(30 * time.Second)}
	s, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if adjust != nil {
		adjust(s)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	rc = redis.NewClient(&redis.Options{Addr: rs.Addr(), Protocol: 2, DisableIdentity: true})
	t.Cleanup(func() { rc.Close() })
	return "http://" + ln.Addr().String(), s, rc
}

// holder records in the directory that node name, at url, holds client id.
func holder(t *testing.T, rc *redis.Client, name, url, id string) {
	t.Helper()
	ctx := context.Background()
	exp := float64(time.Now().Add(time.Minute).UnixMilli())
	if err := rc.ZAdd(ctx, "wsp:client:"+id, redis.Z{Score: exp, Member: name}).Err(); err != nil {
		t.Fatal(err)
	}
	if err := rc.HSet(ctx, "wsp:node:"+name, "url", url).Err(); err != nil {
		t.Fatal(err)
	}
}

// fakeNode is a node that answers every request with answer, counting
// them; when mark is set, it marks its answers as its own (markOwn).
func fakeNode(t *testing.T, rc *redis.Client, name, id string, hits *atomic.Int64, status int, code string, mark bool) {
	t.Helper()
	n := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		io.Copy(io.Discard, r.Body)
		if mark {
			w.Header().Set(headerClusterNode, name)
		}
		if code != "" {
			w.Header().Set(httperr.Header, code)
		}
		w.WriteHeader(status)
		io.WriteString(w, name)
	}))
	t.Cleanup(n.Close)
	holder(t, rc, name, n.URL, id)
}

// deadURL is the URL of a port nothing listens on.
func deadURL(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	return "http://" + ln.Addr().String()
}

// appRequest sends method to http://dest.test/ for client id through the
// node at base, with body if not empty, and returns the answer, its body
// read.
func appRequest(t *testing.T, base, method, id, body string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, base+"/request", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body == "" {
		req.Body = nil
	}
	req.Header.Set(headerDestination, "http://dest.test/")
	req.Header.Set(headerClient, id)
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s through %s: %v", method, base, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// TestForwardRetries: which holders a node tries, in what cases, and what
// the app gets; a request is never executed twice.
func TestForwardRetries(t *testing.T) {
	base, s, rc := forwardingNode(t, nil)

	t.Run("a dead holder listed with a live one", func(t *testing.T) {
		var hits atomic.Int64
		holder(t, rc, "dead", deadURL(t), "c1")
		fakeNode(t, rc, "live", "c1", &hits, 200, "", false)
		for i := range 8 { // in either order
			if resp, body := appRequest(t, base, "GET", "c1", ""); resp.StatusCode != 200 || body != "live" || resp.Header.Get("Via") != "1.1 live" {
				t.Fatalf("request %d: %d %q Via=%q", i, resp.StatusCode, body, resp.Header.Get("Via"))
			}
		}
	})
	t.Run("every holder dead", func(t *testing.T) {
		holder(t, rc, "dead1", deadURL(t), "c2")
		holder(t, rc, "dead2", deadURL(t), "c2")
		resp, body := appRequest(t, base, "GET", "c2", "")
		if resp.StatusCode != 503 || resp.Header.Get(httperr.Header) != httperr.NodeUnreachable || resp.Header.Get("Retry-After") == "" ||
			!strings.Contains(body, "dead1") || !strings.Contains(body, "dead2") {
			t.Fatalf("%d %s Retry-After=%q: %s", resp.StatusCode, resp.Header.Get(httperr.Header), resp.Header.Get("Retry-After"), body)
		}
	})
	t.Run("no_client from the holder itself, without a body: the next is tried", func(t *testing.T) {
		var hits atomic.Int64
		fakeNode(t, rc, "gone1", "c3", &hits, 503, httperr.NoClient, true)
		fakeNode(t, rc, "gone2", "c3", &hits, 503, httperr.NoClient, true)
		resp, _ := appRequest(t, base, "GET", "c3", "")
		if resp.StatusCode != 503 || resp.Header.Get(httperr.Header) != httperr.NoClient || hits.Load() != 2 {
			t.Fatalf("%d %s after %d attempts, want 503 no_client after 2", resp.StatusCode, resp.Header.Get(httperr.Header), hits.Load())
		}
		if v := resp.Header.Get(headerClusterNode); v != "" {
			t.Fatalf("the app got %s: %q", headerClusterNode, v)
		}
		hits.Store(0)
		if resp, _ := appRequest(t, base, "POST", "c3", "a body"); resp.StatusCode != 503 || hits.Load() != 1 {
			t.Fatalf("a request with a body: %d after %d attempts, want 503 after one", resp.StatusCode, hits.Load())
		}
	})
	t.Run("no_client that the holder did not write is passed on", func(t *testing.T) {
		// A destination (or client) may answer 503 no_client itself: the
		// request ran, and must not run again elsewhere.
		var hits atomic.Int64
		fakeNode(t, rc, "dest1", "c4", &hits, 503, httperr.NoClient, false)
		fakeNode(t, rc, "dest2", "c4", &hits, 503, httperr.NoClient, false)
		for range 4 {
			hits.Store(0)
			if resp, _ := appRequest(t, base, "GET", "c4", ""); resp.StatusCode != 503 || hits.Load() != 1 {
				t.Fatalf("%d after %d attempts, want the first answer, after one", resp.StatusCode, hits.Load())
			}
		}
	})
	t.Run("a holder whose name or URL in Redis is invalid is skipped", func(t *testing.T) {
		var hits atomic.Int64
		fakeNode(t, rc, "bad name\r\nX-Injected: 1", "c5", &hits, 200, "", false)
		holder(t, rc, "no-url", "ftp://127.0.0.1:1", "c5")
		resp, body := appRequest(t, base, "GET", "c5", "")
		if resp.StatusCode != 503 || resp.Header.Get(httperr.Header) != httperr.NoClient || !strings.Contains(body, "to any node") || hits.Load() != 0 {
			t.Fatalf("%d %s after %d attempts: %s", resp.StatusCode, resp.Header.Get(httperr.Header), hits.Load(), body)
		}
	})
	if got := s.cluster.forwarded.Load(); got == 0 {
		t.Fatal("nothing counted as forwarded")
	}
}

// TestForwardAnswerTimeout: a node that takes a request and never answers
// costs the app answerTimeout at most, and the request is not sent to
// another node: it may have run.
func TestForwardAnswerTimeout(t *testing.T) {
	if s := clusterServer(t, nil); s.cluster.transport.ResponseHeaderTimeout != s.cfg.Timeout.D()+connectAnswerTimeout || s.cluster.answerTimeout != s.cfg.Timeout.D()+connectAnswerTimeout {
		t.Fatalf("the wait for a node's answer is bounded by %s (%s for CONNECT), want timeout + %s",
			s.cluster.transport.ResponseHeaderTimeout, s.cluster.answerTimeout, connectAnswerTimeout)
	}
	const bound = 200 * time.Millisecond
	base, _, rc := forwardingNode(t, func(s *Server) {
		s.cluster.answerTimeout = bound
		s.cluster.transport.ResponseHeaderTimeout = bound
	})
	silent := make(chan struct{})
	var hits, others atomic.Int64
	mute := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		select {
		case <-silent:
		case <-r.Context().Done():
		}
	}))
	defer mute.Close()
	defer close(silent)
	holder(t, rc, "mute", mute.URL, "c1")
	fakeNode(t, rc, "other", "c1", &others, 200, "", false)
	for hits.Load() == 0 { // until the mute node has been picked first
		before := others.Load()
		start := time.Now()
		resp, body := appRequest(t, base, "GET", "c1", "")
		if resp.StatusCode == 200 {
			continue // the other node was picked first
		}
		if took := time.Since(start); resp.StatusCode != 504 || resp.Header.Get(httperr.Header) != httperr.NodeUnreachable || took > bound+2*time.Second {
			t.Fatalf("%d %s after %s: %s", resp.StatusCode, resp.Header.Get(httperr.Header), took, body)
		}
		if others.Load() != before {
			t.Fatal("a request the mute node took was sent to the other node too")
		}
	}

	// CONNECT: the same bound.
	holder(t, rc, "mute-connect", "http://"+silentListener(t), "c2")
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "CONNECT db.test:5432 HTTP/1.1\r\nHost: db.test:5432\r\n%s: c2\r\n\r\n", headerClient)
	conn.SetReadDeadline(time.Now().Add(bound + 5*time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: "CONNECT"})
	if err != nil || resp.StatusCode != 504 || resp.Header.Get(httperr.Header) != httperr.NodeUnreachable {
		t.Fatalf("CONNECT through a mute node: %v %v", resp, err)
	}
}

// silentListener accepts connections and reads them, never answering,
// until the test ends; it returns its address.
func silentListener(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				io.Copy(io.Discard, c)
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().String()
}

// TestForwardConnectAppGone: an app that goes away while its CONNECT waits
// for the other node's answer is recorded as gone (499), not as a 502.
func TestForwardConnectAppGone(t *testing.T) {
	base, s, rc := forwardingNode(t, nil)
	holder(t, rc, "mute", "http://"+silentListener(t), "c1")
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "CONNECT db.test:5432 HTTP/1.1\r\nHost: db.test:5432\r\n%s: c1\r\n\r\n", headerClient)
	waitFor(t, "the CONNECT to be forwarded", func() bool { return s.cluster.forwarded.Load() == 1 })
	conn.Close()
	waitFor(t, `wsp_cluster_forwarded_total{result="app_gone"}`, func() bool {
		m := scrapeMetrics(s)
		return strings.Contains(m, `wsp_cluster_forwarded_total{result="app_gone"} 1`)
	})
	if m := scrapeMetrics(s); strings.Contains(m, `result="tunnel_broken"`) {
		t.Fatalf("counted as broken too:\n%s", m)
	}
}

func scrapeMetrics(s *Server) string {
	rec := httptest.NewRecorder()
	s.metrics.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	return rec.Body.String()
}
