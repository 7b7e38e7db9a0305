// Package test holds wsp's end-to-end tests: a real server and real clients
// on loopback listeners, relaying to real backends.
package test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"wsp/internal/client"
	"wsp/internal/config"
	"wsp/internal/server"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if builtBin != "" {
		os.RemoveAll(filepath.Dir(builtBin))
	}
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// relay is a running wsp server.
type relay struct {
	t      testing.TB
	srv    *server.Server
	addr   string // host:port
	url    string // http://host:port
	cancel context.CancelFunc
	done   chan error
}

// startServer runs a server on ln (a fresh loopback listener when nil)
// until the test ends.
func startServer(t testing.TB, cfg config.Server, ln net.Listener) *relay {
	t.Helper()
	if ln == nil {
		var err error
		ln, err = net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
	}
	srv, err := server.New(cfg, testLogger(t, "server"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &relay{t: t, srv: srv, addr: ln.Addr().String(), url: "http://" + ln.Addr().String(), cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() { r.stop() })
	return r
}

// inflight counts the streams in use over all sessions.
func (r *relay) inflight() int64 {
	var n int64
	for _, s := range r.srv.Stats().Sessions {
		n += s.InFlight
	}
	return n
}

func (r *relay) waiting() int { return r.srv.Stats().Waiting }

func (r *relay) sessions() int { return len(r.srv.Stats().Sessions) }

// stop drains the server and waits for Serve to return; idempotent.
func (r *relay) stop() error {
	r.cancel()
	select {
	case err, ok := <-r.done:
		if ok {
			close(r.done)
		}
		return err
	case <-time.After(30 * time.Second):
		r.t.Fatal("server did not stop")
		return nil
	}
}

func serverConfig() config.Server {
	cfg := config.DefaultServer()
	cfg.Port = 0
	cfg.Timeout = config.Duration(2 * time.Second)
	return cfg
}

func clientConfig(r *relay, id string) config.Client {
	cfg := config.DefaultClient()
	cfg.ID = id
	cfg.Targets = []string{"ws://" + r.addr + "/register"}
	cfg.AllowAny = true
	cfg.Drain = config.Duration(5 * time.Second)
	return cfg
}

// agent is a running wsp client.
type agent struct {
	c      *client.Client
	cancel context.CancelFunc
	done   chan struct{}
}

// startClient runs a client until the test ends and waits until it is
// connected.
func startClient(t testing.TB, cfg config.Client) *agent {
	t.Helper()
	c, err := client.New(cfg, testLogger(t, "client"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &agent{c: c, cancel: cancel, done: make(chan struct{})}
	go func() { defer close(a.done); c.Run(ctx) }()
	t.Cleanup(a.stop)
	waitFor(t, "client connected", c.Ready)
	return a
}

func (a *agent) stop() {
	a.cancel()
	<-a.done
}

// waitFor polls cond until it holds or 10 s pass.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// backend is an internal API for the client to reach.
func backend(t testing.TB, h http.Handler) *httptest.Server {
	t.Helper()
	b := httptest.NewServer(h)
	t.Cleanup(b.Close)
	return b
}

// setup starts a server, one client allowed anywhere, and a backend.
func setup(t testing.TB, h http.Handler) (*relay, *httptest.Server) {
	t.Helper()
	r := startServer(t, serverConfig(), nil)
	startClient(t, clientConfig(r, "c1"))
	return r, backend(t, h)
}

// request builds a /request call to dest through r.
func (r *relay) request(t *testing.T, method, dest string, body io.Reader) *http.Request {
	t.Helper()
	req, err := http.NewRequest(method, r.url+"/request", body)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Proxy-Destination", dest)
	return req
}

// do sends req with a client that keeps no connections after the test.
func do(t *testing.T, req *http.Request) *http.Response {
	t.Helper()
	resp, err := testHTTP.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

var testHTTP = &http.Client{
	Transport: &http.Transport{DisableKeepAlives: true, DisableCompression: true},
	CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	},
}

func readAll(t *testing.T, r io.Reader) string {
	t.Helper()
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// testLogger logs through t, quiet unless the test fails or -v is given.
func testLogger(t testing.TB, component string) *slog.Logger {
	if _, ok := t.(*testing.B); ok {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(&tWriter{t: t}, &slog.HandlerOptions{Level: slog.LevelDebug})).With("component", component)
}

type tWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *tWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		func() {
			defer func() {
				if recover() != nil { // logging after the test ended
					w.done = true
				}
			}()
			w.t.Log(strings.TrimRight(string(p), "\n"))
		}()
	}
	return len(p), nil
}

func mustParse(t *testing.T, raw string) *url.URL {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// logBuffer keeps log lines for a test to search; safe for concurrent use.
type logBuffer struct {
	mu  sync.Mutex
	buf strings.Builder // guarded by mu
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// count says how many times substr was logged.
func (b *logBuffer) count(substr string) int {
	return strings.Count(b.String(), substr)
}
