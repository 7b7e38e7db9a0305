package server

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"wsp/internal/config"
	"wsp/internal/httperr"
	"wsp/internal/tunnel"
)

// startServer serves a Server on a loopback port until the test ends.
func startServer(t *testing.T) (base string, s *Server, hc *http.Client) {
	t.Helper()
	cfg := config.DefaultServer()
	cfg.Timeout = config.Duration(50 * time.Millisecond)
	cfg.Drain = config.Duration(time.Second)
	s, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
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
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	return "http://" + ln.Addr().String(), s, &http.Client{Transport: tr}
}

func TestServeHTTPEndpoints(t *testing.T) {
	base, _, hc := startServer(t)
	for _, tc := range []struct {
		name   string
		path   string
		header map[string]string
		status int
		code   string // X-Wsp-Error, when a failure
	}{
		{"status", "/status", nil, 200, ""},
		{"healthz", "/healthz", nil, 200, ""},
		{"readyz", "/readyz", nil, 200, ""},
		{"unknown path", "/nope", nil, 404, ""},
		{"request without destination", "/request", nil, 400, httperr.BadDestination},
		{"request with ftp destination", "/request", map[string]string{headerDestination: "ftp://example.com/"}, 400, httperr.BadDestination},
		{"request with bad client id", "/request", map[string]string{headerDestination: "http://example.com/", headerClient: "not/valid"}, 400, httperr.BadRequest},
		{"request, nobody connected", "/request", map[string]string{headerDestination: "http://example.com/"}, 503, httperr.NoClient},
		{"request, named client not connected", "/request", map[string]string{headerDestination: "http://example.com/", headerClient: "dc9"}, 503, httperr.NoClient},
		{"register without subprotocol", "/register", nil, 400, httperr.BadRequest},
		{"register without client id", "/register", map[string]string{"Sec-WebSocket-Protocol": tunnel.Subprotocol}, 400, httperr.BadRequest},
		{"register with bad max streams", "/register", map[string]string{"Sec-WebSocket-Protocol": tunnel.Subprotocol, tunnel.HeaderClientID: "c1", tunnel.HeaderMaxStreams: "0"}, 400, httperr.BadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest("GET", base+tc.path, nil)
			for k, v := range tc.header {
				req.Header.Set(k, v)
			}
			resp, err := hc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.status || resp.Header.Get(httperr.Header) != tc.code {
				t.Fatalf("got %d %s=%q %q, want %d %q", resp.StatusCode, httperr.Header, resp.Header.Get(httperr.Header), body, tc.status, tc.code)
			}
			if !strings.HasSuffix(string(body), "\n") || strings.Count(string(body), "\n") != 1 {
				t.Errorf("body %q is not one line", body)
			}
			if tc.status == 503 && resp.Header.Get("Retry-After") == "" {
				t.Error("503 without Retry-After")
			}
		})
	}
}

// fakeClient registers over a real WebSocket and answers every request it
// gets with "hello", after checking it. It serves requests one after
// another on a stream until the server closes it, unless oneShot, when it
// closes each stream after one answer (as a client that is draining may).
func fakeClient(t *testing.T, base, id string, maxStreams int, oneShot bool, check func(*http.Request)) *tunnel.Session {
	t.Helper()
	hello := tunnel.Hello{ClientID: id, MaxStreams: maxStreams, Version: "test"}
	d := tunnel.NewDialer(5 * time.Second)
	d.Proxy = nil
	ws, resp, err := d.Dial("ws"+strings.TrimPrefix(base, "http")+"/register", hello.Header())
	if err != nil {
		t.Fatal(err)
	}
	if resp.Header.Get(tunnel.HeaderSession) == "" {
		t.Errorf("101 without %s", tunnel.HeaderSession)
	}
	sess, err := tunnel.NewClientSession(ws, tunnel.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			st, err := sess.AcceptStream()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer st.Close()
				st.SetDeadline(time.Now().Add(10 * time.Second))
				br := bufio.NewReader(st)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return // the server closed the stream
					}
					check(req)
					io.Copy(io.Discard, req.Body)
					fmt.Fprintf(st, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-From: %s\r\n\r\nhello", id)
					if oneShot {
						return
					}
				}
			})
		}
	})
	t.Cleanup(func() { sess.Close(); wg.Wait() })
	return sess
}

// get sends a GET for dest through the server to client id.
func get(t *testing.T, hc *http.Client, base, id, dest string) (status int, body string, hdr http.Header) {
	t.Helper()
	req, _ := http.NewRequest("GET", base+"/request", nil)
	req.Header.Set(headerDestination, dest)
	req.Header.Set(headerClient, id)
	req.Header.Set("X-Proxy-Secret", "for the server only")
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp.StatusCode, string(b), resp.Header
}

func TestRelayThroughSession(t *testing.T) {
	base, srv, hc := startServer(t)
	sess := fakeClient(t, base, "c1", 2, false, func(r *http.Request) {
		if r.RequestURI != "http://backend.test/hello?x=1" {
			t.Errorf("request URI %q, want the absolute destination", r.RequestURI)
		}
		for name := range r.Header {
			if strings.HasPrefix(name, proxyHeaderPrefix) {
				t.Errorf("header %s reached the client", name)
			}
		}
		if r.Header.Get("X-Forwarded-For") == "" {
			t.Error("X-Forwarded-For not set")
		}
	})
	waitFor(t, "the session to register", func() bool { return len(srv.Stats().Sessions) == 1 })
	if got := srv.Stats().Sessions[0]; got.Client != "c1" || got.Version != "test" {
		t.Fatalf("session %+v", got)
	}

	for i := range 5 { // more than maxStreams, one after another: slots are freed
		status, body, hdr := get(t, hc, base, "c1", "http://backend.test/hello?x=1")
		if status != 200 || body != "hello" || hdr.Get("X-From") != "c1" {
			t.Fatalf("request %d: %d %q %v", i, status, body, hdr)
		}
	}
	waitFor(t, "slots to be released", func() bool { return srv.Stats().Sessions[0].InFlight == 0 })
	if n := srv.Stats().Sessions[0].Requests; n != 5 {
		t.Errorf("Requests = %d, want 5", n)
	}

	sess.Close()
	waitFor(t, "the session to be dropped", func() bool { return len(srv.Stats().Sessions) == 0 })
}

// A stream the client closed after an exchange (it is draining, or serves
// one request per stream) never read the next request: the server must
// send that request again on a fresh stream rather than fail it.
func TestRelayRetriesStreamClosedWhileIdle(t *testing.T) {
	base, srv, hc := startServer(t)
	fakeClient(t, base, "c1", 2, true, func(*http.Request) {})
	waitFor(t, "the session to register", func() bool { return len(srv.Stats().Sessions) == 1 })
	for i := range 3 {
		if status, body, _ := get(t, hc, base, "c1", "http://backend.test/"); status != 200 || body != "hello" {
			t.Fatalf("request %d: %d %q", i, status, body)
		}
	}
}

// Exchanges that end cleanly leave their stream for the next request, and
// idle streams are closed once they are old enough.
func TestStreamsReusedThenClosedWhenIdle(t *testing.T) {
	base, srv, hc := startServer(t)
	fakeClient(t, base, "c1", 4, false, func(*http.Request) {})
	waitFor(t, "the session to register", func() bool { return len(srv.Stats().Sessions) == 1 })
	for i := range 3 {
		if status, body, _ := get(t, hc, base, "c1", "http://backend.test/"); status != 200 || body != "hello" {
			t.Fatalf("request %d: %d %q", i, status, body)
		}
	}
	s := srv.reg.sessions()[0]
	idle := func() int { s.mu.Lock(); defer s.mu.Unlock(); return len(s.idle) }
	waitFor(t, "the stream to go idle", func() bool { return idle() == 1 })
	if n := s.mux.NumStreams(); n != 1 {
		t.Fatalf("%d streams open after 3 sequential requests, want 1 reused", n)
	}
	s.closeIdleStreams(time.Now().Add(-time.Hour)) // nothing that old
	if idle() != 1 {
		t.Fatal("a fresh idle stream was closed")
	}
	s.closeIdleStreams(time.Now().Add(time.Hour))
	if idle() != 0 {
		t.Fatal("an old idle stream was kept")
	}
	waitFor(t, "the client to see the stream closed", func() bool { return s.mux.NumStreams() == 0 })
}

// publicListener reports a non-loopback address, as a server listening
// beyond loopback would.
type publicListener struct{ net.Listener }

func (publicListener) Addr() net.Addr {
	return &net.TCPAddr{IP: net.ParseIP("203.0.113.1"), Port: 8080}
}

func TestOpenRelayWarning(t *testing.T) {
	for _, tc := range []struct {
		name   string
		public bool
		auth   bool
		warned bool
	}{
		{"loopback", false, false, false},
		{"public without auth", true, false, true},
		{"public with auth", true, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var logs strings.Builder
			var mu sync.Mutex
			cfg := config.DefaultServer()
			if tc.auth {
				cfg.Auth.Tokens = []string{"t"}
			}
			s, err := New(cfg, slog.New(slog.NewTextHandler(writerFunc(func(p []byte) (int, error) {
				mu.Lock()
				defer mu.Unlock()
				return logs.Write(p)
			}), nil)))
			if err != nil {
				t.Fatal(err)
			}
			ln, _ := net.Listen("tcp", "127.0.0.1:0")
			var l net.Listener = ln
			if tc.public {
				l = publicListener{ln}
			}
			ctx, cancel := context.WithCancel(context.Background())
			cancel() // Serve logs the warning first, then drains at once
			s.Serve(ctx, l)
			mu.Lock()
			defer mu.Unlock()
			if got := strings.Contains(logs.String(), "open relay"); got != tc.warned {
				t.Fatalf("warned=%v, want %v:\n%s", got, tc.warned, logs.String())
			}
		})
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
