package test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"wsp/internal/config"
	"wsp/internal/tunnel"
)

// TestManyPostsDoNotExhaustStreams: requests with a body open fresh
// streams; parking every one as idle used to fill the client's limit.
func TestManyPostsDoNotExhaustStreams(t *testing.T) {
	r := startServer(t, serverConfig(), nil)
	cfg := clientConfig(r, "c1")
	cfg.PoolMaxSize = 2
	startClient(t, cfg)
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) { io.Copy(w, req.Body) }))
	for i := range 20 {
		resp := do(t, r.request(t, "POST", b.URL, strings.NewReader(fmt.Sprint(i))))
		if got := readAll(t, resp.Body); resp.StatusCode != 200 || got != fmt.Sprint(i) {
			t.Fatalf("POST %d: %d %q", i, resp.StatusCode, got)
		}
	}
}

// TestUnaskedSwitchDoesNotLeakSlot: a destination answering 101 to a
// request that asked for no upgrade gets a 502, and the session's slot is
// freed.
func TestUnaskedSwitchDoesNotLeakSlot(t *testing.T) {
	dest := rawDestination(t, func(c net.Conn) {
		defer c.Close()
		buf := make([]byte, 4096)
		c.Read(buf)
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		c.Read(buf)
	})
	r := startServer(t, serverConfig(), nil)
	startClient(t, clientConfig(r, "c1"))
	for range 3 {
		resp := do(t, r.request(t, "GET", "http://"+dest+"/", nil))
		if readAll(t, resp.Body); resp.StatusCode != 502 {
			t.Fatalf("unasked 101: %d, want 502", resp.StatusCode)
		}
	}
	waitFor(t, "slots released", func() bool { return r.inflight() == 0 })
}

// TestSlowUploadWithinHeaderTimeout: headertimeout counts from the end of
// the request, not its start.
func TestSlowUploadWithinHeaderTimeout(t *testing.T) {
	r := startServer(t, serverConfig(), nil)
	cfg := clientConfig(r, "c1")
	cfg.HeaderTimeout = config.Duration(300 * time.Millisecond)
	startClient(t, cfg)
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		n, _ := io.Copy(io.Discard, req.Body)
		fmt.Fprint(w, n)
	}))
	pr, pw := io.Pipe()
	go func() {
		for range 8 { // 800 ms of upload
			pw.Write([]byte("0123456789"))
			time.Sleep(100 * time.Millisecond)
		}
		pw.Close()
	}()
	resp := do(t, r.request(t, "POST", b.URL, pr))
	if got := readAll(t, resp.Body); resp.StatusCode != 200 || got != "80" {
		t.Fatalf("slow upload: %d %q", resp.StatusCode, got)
	}
}

// TestSilentTLSDestinationBounded: a destination that accepts TCP and never
// answers the TLS handshake is given up on after dialtimeout.
func TestSilentTLSDestinationBounded(t *testing.T) {
	dest := rawDestination(t, func(net.Conn) {}) // held open, silent
	r := startServer(t, serverConfig(), nil)
	cfg := clientConfig(r, "c1")
	cfg.DialTimeout = config.Duration(300 * time.Millisecond)
	startClient(t, cfg)
	start := time.Now()
	resp := do(t, r.request(t, "GET", "https://"+dest+"/", nil))
	readAll(t, resp.Body)
	if resp.StatusCode != 504 || time.Since(start) > 5*time.Second {
		t.Fatalf("silent TLS destination: %d after %v", resp.StatusCode, time.Since(start))
	}
}

// TestPostNotReplayedOnStaleConnection: a POST whose kept-alive connection
// turns out closed is not sent a second time.
func TestPostNotReplayedOnStaleConnection(t *testing.T) {
	var posts atomic.Int32
	addr := rawDestination(t, func(c net.Conn) {
		defer c.Close()
		buf := make([]byte, 4096)
		// First request: answered, connection kept.
		c.Read(buf)
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		// Second: read, then closed unanswered, as a server closing an
		// idle connection at the same moment would.
		if n, _ := c.Read(buf); n > 0 && strings.HasPrefix(string(buf[:n]), "POST") {
			posts.Add(1)
		}
	})
	r := startServer(t, serverConfig(), nil)
	startClient(t, clientConfig(r, "c1"))
	dest := "http://" + addr + "/"
	readAll(t, do(t, r.request(t, "GET", dest, nil)).Body)
	resp := do(t, r.request(t, "POST", dest, nil))
	readAll(t, resp.Body)
	if resp.StatusCode != 502 || posts.Load() != 1 {
		t.Fatalf("POST on a stale connection: %d, executed %d times; want 502, once", resp.StatusCode, posts.Load())
	}
}

// TestUploadToStalledDestinationBounded: a destination that stops reading
// a request body (and never answers) fails the request after headertimeout
// of no progress, instead of holding it for ever.
func TestUploadToStalledDestinationBounded(t *testing.T) {
	dest := rawDestination(t, func(c net.Conn) {
		c.Read(make([]byte, 1024)) // the head, then nothing more
	})
	r := startServer(t, serverConfig(), nil)
	cfg := clientConfig(r, "c1")
	cfg.HeaderTimeout = config.Duration(300 * time.Millisecond)
	startClient(t, cfg)
	start := time.Now()
	resp := do(t, r.request(t, "POST", "http://"+dest+"/", strings.NewReader(strings.Repeat("u", 64<<20))))
	readAll(t, resp.Body)
	if resp.StatusCode < 500 || time.Since(start) > 20*time.Second {
		t.Fatalf("upload to a stalled destination: %d after %v", resp.StatusCode, time.Since(start))
	}
}

// TestUpgradeWithBodyRefused: an upgrade request carrying a body is refused
// before it goes anywhere.
func TestUpgradeWithBodyRefused(t *testing.T) {
	r := startServer(t, serverConfig(), nil)
	startClient(t, clientConfig(r, "c1"))
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { t.Error("the destination was reached") }))
	req := r.request(t, "POST", b.URL, strings.NewReader("body"))
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	resp := do(t, req)
	if msg := readAll(t, resp.Body); resp.StatusCode != 400 || !strings.Contains(msg, "upgrade") {
		t.Fatalf("upgrade with a body: %d %q", resp.StatusCode, msg)
	}
}

// rawDestination is a TCP destination that runs serve on each connection
// it accepts. The test's end closes the listener and every connection and
// waits for the goroutines.
func rawDestination(t *testing.T, serve func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				serve(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

// TestResetStreamGoesElsewhere: a stream the client's multiplexer resets
// (it crossed the client's go-away, or its accept backlog was full) was
// never read, so a request without a body on it goes to another session
// rather than failing with 502.
func TestResetStreamGoesElsewhere(t *testing.T) {
	cfg := serverConfig()
	cfg.Timeout = config.Duration(5 * time.Second)
	r := startServer(t, cfg, nil)
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "served") }))

	// A session that never accepts a stream and keeps a backlog of one:
	// the first request waits in it, the next one is reset.
	tc := tunnel.DefaultConfig()
	tc.AcceptBacklog = 1
	hello := tunnel.Hello{ClientID: "rst", MaxStreams: 2, Version: "test"}
	ws, _, err := tunnel.NewDialer(5*time.Second).Dial("ws://"+r.addr+"/register", hello.Header())
	if err != nil {
		t.Fatal(err)
	}
	stuck, err := tunnel.NewClientSession(ws, tc)
	if err != nil {
		t.Fatal(err)
	}
	defer stuck.Close()
	waitFor(t, "the session to register", func() bool { return r.sessions() == 1 })

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	first := r.request(t, "GET", b.URL, nil)
	first.Header.Set("X-Proxy-Client", "rst")
	firstDone := make(chan struct{})
	go func() {
		defer close(firstDone)
		if resp, err := testHTTP.Do(first.WithContext(ctx)); err == nil {
			resp.Body.Close()
		}
	}()
	waitFor(t, "the first request to wait in the backlog", func() bool { return r.inflight() == 1 })

	second := r.request(t, "GET", b.URL, nil)
	second.Header.Set("X-Proxy-Client", "rst")
	type result struct {
		status int
		body   string
		err    error
	}
	res := make(chan result, 1)
	go func() {
		resp, err := testHTTP.Do(second)
		if err != nil {
			res <- result{err: err}
			return
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		res <- result{status: resp.StatusCode, body: string(body)}
	}()
	// The reset comes at once; a real client of the pool connects after
	// it, and the retried request waits for it (timeout 5s).
	time.Sleep(200 * time.Millisecond)
	select {
	case got := <-res:
		t.Fatalf("the reset request ended before another session could take it: %d %q %v", got.status, got.body, got.err)
	default:
	}
	startClient(t, clientConfig(r, "rst"))
	select {
	case got := <-res:
		if got.err != nil || got.status != 200 || got.body != "served" {
			t.Fatalf("reset request: %d %q %v, want 200 from the other session", got.status, got.body, got.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the reset request got no answer")
	}
	// The resetting session was tried once for the second request, not
	// again and again while the other session was away.
	for _, s := range r.srv.Stats().Sessions {
		if s.Version == "test" && s.Requests != 2 {
			t.Errorf("the resetting session was given %d requests, want 2 (one each)", s.Requests)
		}
	}
	cancel()
	<-firstDone
}

// TestReconnectAtLimitFindsRoom: a client at maxsessionsperid whose session
// just closed reconnects at once; the closed session, not yet reaped, must
// not count against the limit.
func TestReconnectAtLimitFindsRoom(t *testing.T) {
	cfg := serverConfig()
	cfg.MaxSessionsPerID = 1
	r := startServer(t, cfg, nil)
	hello := tunnel.Hello{ClientID: "limited", MaxStreams: 1, Version: "test"}
	dialer := tunnel.NewDialer(5 * time.Second)
	for i := range 5 {
		ws, resp, err := dialer.Dial("ws://"+r.addr+"/register", hello.Header())
		if err != nil {
			status := 0
			if resp != nil {
				status = resp.StatusCode
			}
			t.Fatalf("reconnect %d right after closing the previous session: %d %v", i, status, err)
		}
		sess, err := tunnel.NewClientSession(ws, tunnel.DefaultConfig())
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the server to hold the session", func() bool { return r.sessions() == 1 })
		sess.Close()
		// Long enough for the server to see the close, well within the
		// reaper's period (100 ms).
		time.Sleep(10 * time.Millisecond)
	}
}
