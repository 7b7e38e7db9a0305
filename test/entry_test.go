package test

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"wsp/internal/config"
	"wsp/internal/forward"
	"wsp/internal/rules"
)

// proxyClient is an HTTP client using r as its proxy, like HTTP_PROXY.
func proxyClient(t *testing.T, r *relay, tlsCfg *tls.Config) *http.Client {
	tr := &http.Transport{Proxy: http.ProxyURL(mustParse(t, r.url)), TLSClientConfig: tlsCfg}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

func TestProxyModePostAndEvents(t *testing.T) {
	r, b := setup(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		switch req.URL.Path {
		case "/echo":
			io.Copy(w, req.Body)
		case "/events":
			w.Header().Set("Content-Type", "text/event-stream")
			for i := range 3 {
				fmt.Fprintf(w, "data: %d\n\n", i)
				w.(http.Flusher).Flush()
			}
		}
	}))
	hc := proxyClient(t, r, nil)
	resp, err := hc.Post(b.URL+"/echo", "text/plain", strings.NewReader("posted through a proxy setting"))
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, resp.Body); got != "posted through a proxy setting" {
		t.Fatalf("echo %q", got)
	}
	resp.Body.Close()
	resp, err = hc.Get(b.URL + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if got := readAll(t, resp.Body); got != "data: 0\n\ndata: 1\n\ndata: 2\n\n" || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("events %q", got)
	}
}

// TestConnectCarriesHTTPS: an HTTPS client using wsp as its proxy tunnels
// TLS end to end through CONNECT.
func TestConnectCarriesHTTPS(t *testing.T) {
	r := startServer(t, serverConfig(), nil)
	startClient(t, clientConfig(r, "c1"))
	b := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		fmt.Fprintf(w, "secure %s", req.URL.Path)
	}))
	t.Cleanup(b.Close)
	hc := proxyClient(t, r, b.Client().Transport.(*http.Transport).TLSClientConfig)
	for i := range 3 { // the tunnel is kept alive between requests
		resp, err := hc.Get(b.URL + fmt.Sprintf("/%d", i))
		if err != nil {
			t.Fatal(err)
		}
		if got := readAll(t, resp.Body); got != fmt.Sprintf("secure /%d", i) {
			t.Fatalf("got %q", got)
		}
		resp.Body.Close()
	}
}

// halfCloseEcho accepts connections, reads until the peer half-closes, then
// answers with what it read, reversed in order of lines, and closes.
func halfCloseEcho(t *testing.T) string {
	t.Helper()
	return rawDestination(t, func(c net.Conn) {
		defer c.Close()
		data, _ := io.ReadAll(c) // until the half-close
		lines := strings.Split(strings.TrimSpace(string(data)), "\n")
		for i := len(lines) - 1; i >= 0; i-- {
			fmt.Fprintln(c, lines[i])
		}
	})
}

func TestConnectRawTCPWithHalfClose(t *testing.T) {
	r := startServer(t, serverConfig(), nil)
	startClient(t, clientConfig(r, "c1"))
	echo := halfCloseEcho(t)

	c, err := net.Dial("tcp", r.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", echo, echo)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: "CONNECT"})
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %v %v", resp, err)
	}
	io.WriteString(c, "one\ntwo\nthree\n")
	c.(*net.TCPConn).CloseWrite() // the echo answers only after this
	got, err := io.ReadAll(br)
	if err != nil || string(got) != "three\ntwo\none\n" {
		t.Fatalf("got %q, %v", got, err)
	}
}

func TestForwardCommand(t *testing.T) {
	r := startServer(t, serverConfig(), nil)
	startClient(t, clientConfig(r, "c1"))
	echo := halfCloseEcho(t)
	f, err := forward.New(forward.Config{Server: r.url, To: echo, Client: "c1"}, testLogger(t, "forward"))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Serve(ctx, ln) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	for i := range 3 { // one tunnel per connection
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(c, "a%d\nb%d\n", i, i)
		c.(*net.TCPConn).CloseWrite()
		got, err := io.ReadAll(c)
		c.Close()
		if want := fmt.Sprintf("b%d\na%d\n", i, i); err != nil || string(got) != want {
			t.Fatalf("connection %d: got %q (%v), want %q", i, got, err, want)
		}
	}
}

// wsEcho is a WebSocket backend that echoes every message.
func wsEcho(t *testing.T) *httptest.Server {
	return backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		for {
			typ, msg, err := c.Read(r.Context())
			if err != nil {
				return
			}
			if err := c.Write(r.Context(), typ, msg); err != nil {
				return
			}
		}
	}))
}

func echoMessages(t *testing.T, c *websocket.Conn, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i := range n {
		want := fmt.Sprintf("message %d %s", i, strings.Repeat("x", i%300))
		if err := c.Write(ctx, websocket.MessageText, []byte(want)); err != nil {
			t.Fatal(err)
		}
		_, got, err := c.Read(ctx)
		if err != nil || string(got) != want {
			t.Fatalf("message %d: got %q, %v", i, got, err)
		}
	}
	c.Close(websocket.StatusNormalClosure, "")
}

func TestWebSocketPassthrough(t *testing.T) {
	r := startServer(t, serverConfig(), nil)
	startClient(t, clientConfig(r, "c1"))
	b := wsEcho(t)
	wsURL := "ws" + strings.TrimPrefix(b.URL, "http") + "/echo"

	t.Run("request entry, ws:// destination", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, _, err := websocket.Dial(ctx, "ws://"+r.addr+"/request", &websocket.DialOptions{
			HTTPHeader: http.Header{"X-Proxy-Destination": {wsURL}},
		})
		if err != nil {
			t.Fatal(err)
		}
		defer c.CloseNow()
		echoMessages(t, c, 500)
	})
	t.Run("proxy entry", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		hc := proxyClient(t, r, nil)
		c, _, err := websocket.Dial(ctx, wsURL, &websocket.DialOptions{HTTPClient: hc})
		if err != nil {
			t.Fatal(err)
		}
		defer c.CloseNow()
		echoMessages(t, c, 500)
	})
	waitFor(t, "streams released", func() bool { return r.inflight() == 0 })
}

// TestChoosingTheClient: two clients with different rules in front of two
// backends; the server picks by explicit id, by route, or by the rules the
// clients advertised.
func TestChoosingTheClient(t *testing.T) {
	hello := func(name string) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "%s via %s", name, r.Header.Get("X-Via-Client"))
		})
	}
	b1, b2 := backend(t, hello("b1")), backend(t, hello("b2"))
	scfg := serverConfig()
	scfg.Timeout = config.Duration(200 * time.Millisecond)
	scfg.Routes = []config.Route{{Host: "^routed\\.test", Client: "c2"}}
	r := startServer(t, scfg, nil)
	c1 := clientConfig(r, "c1")
	c1.AllowAny = false
	c1.Whitelist = []rules.Spec{{URL: "^" + b1.URL + "/"}}
	startClient(t, c1)
	c2 := clientConfig(r, "c2")
	c2.AllowAny = false
	c2.Whitelist = []rules.Spec{{URL: "^" + b2.URL + "/"}, {URL: "^http://routed\\.test:1/"}}
	startClient(t, c2)

	get := func(dest, clientID string) (int, string, string) {
		req := r.request(t, "GET", dest, nil)
		if clientID != "" {
			req.Header.Set("X-Proxy-Client", clientID)
		}
		resp := do(t, req)
		return resp.StatusCode, readAll(t, resp.Body), resp.Header.Get("X-Wsp-Error")
	}
	// By advertised rules: each backend is reached by the only client
	// that accepts it, every time.
	for range 10 {
		if status, body, _ := get(b1.URL+"/", ""); status != 200 || !strings.HasPrefix(body, "b1") {
			t.Fatalf("b1: %d %q", status, body)
		}
		if status, body, _ := get(b2.URL+"/", ""); status != 200 || !strings.HasPrefix(body, "b2") {
			t.Fatalf("b2: %d %q", status, body)
		}
	}
	// Explicitly named: the client decides, and refuses what it does not accept.
	if status, body, code := get(b1.URL+"/", "c2"); status != 403 || code != "client_refused" || !strings.Contains(body, `"c2"`) {
		t.Fatalf("explicit c2 to b1: %d %q %q", status, body, code)
	}
	// Neither accepts: the server answers 403 itself.
	if status, _, code := get("http://elsewhere.test/", ""); status != 403 || code != "client_refused" {
		t.Fatalf("nobody accepts: %d %q", status, code)
	}
	// Unknown id: 503.
	if status, body, code := get(b1.URL+"/", "c9"); status != 503 || code != "no_client" || !strings.Contains(body, `"c9"`) {
		t.Fatalf("unknown id: %d %q %q", status, body, code)
	}
	// A route sends routed.test to c2, which refuses to reach it only
	// because nothing resolves there: the error names c2.
	if status, body, _ := get("http://routed.test:1/", ""); status != 502 || !strings.Contains(body, `"c2"`) {
		t.Fatalf("routed: %d %q", status, body)
	}
	waitFor(t, "streams released", func() bool { return r.inflight() == 0 })
}

// TestMultipleTargets: a client connected to two servers keeps serving
// through one when the other goes away.
func TestMultipleTargets(t *testing.T) {
	r1 := startServer(t, serverConfig(), nil)
	r2 := startServer(t, serverConfig(), nil)
	cfg := clientConfig(r1, "c1")
	cfg.Targets = append(cfg.Targets, "ws://"+r2.addr+"/register")
	startClient(t, cfg)
	waitFor(t, "both sessions", func() bool { return r1.sessions() == 1 && r2.sessions() == 1 })
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") }))
	if err := r1.stop(); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		resp := do(t, r2.request(t, "GET", b.URL, nil))
		if got := readAll(t, resp.Body); resp.StatusCode != 200 || got != "ok" {
			t.Fatalf("through the server left: %d %q", resp.StatusCode, got)
		}
	}
}

func TestIdleTunnelClosed(t *testing.T) {
	scfg := serverConfig()
	scfg.IdleTimeout = config.Duration(300 * time.Millisecond)
	r := startServer(t, scfg, nil)
	ccfg := clientConfig(r, "c1")
	ccfg.KeepAlive = config.Duration(50 * time.Millisecond) // the session itself stays busy
	startClient(t, ccfg)
	echo := halfCloseEcho(t)
	c, err := net.Dial("tcp", r.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", echo, echo)
	br := bufio.NewReader(c)
	if resp, err := http.ReadResponse(br, &http.Request{Method: "CONNECT"}); err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %v %v", resp, err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	start := time.Now()
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("idle tunnel: read %v, want EOF when the server closes it", err)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Fatalf("closed after %v, before idletimeout", d)
	}
	if r.sessions() != 1 {
		t.Fatal("closing the idle tunnel closed the session")
	}
}
