package test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"wsp/internal/config"
	"wsp/internal/legacy"
)

// oldClient behaves like root-gg/wsp's client, as LEGACY-PROTOCOL.md
// describes it: per target it keeps idle connections open (checked every
// tick), never more than max in all, opens a replacement as soon as a
// connection starts a request, and answers refusals with status 527.
type oldClient struct {
	t       testing.TB
	target  string
	id      string
	secret  string
	idle    int
	max     int
	allow   func(*http.Request) bool // its whitelist
	respond func(*websocket.Conn)    // replaces the normal loop, to misbehave

	mu     sync.Mutex
	ended  int // guarded by mu: connections that ended
	conns  int // guarded by mu: open connections
	idleN  int // guarded by mu: connections waiting for a request
	wg     sync.WaitGroup
	ctx    context.Context
	cancel context.CancelFunc
	hc     *http.Client
}

func startOldClient(t testing.TB, r *relay, id string, idle, max int) *oldClient {
	c := &oldClient{t: t, target: "ws://" + r.addr + "/register", id: id, idle: idle, max: max,
		allow: func(*http.Request) bool { return true },
		hc: &http.Client{Transport: &http.Transport{}, CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		}}}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	return c
}

// run starts the pool keeper; stop ends everything.
func (c *oldClient) run() {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		t := time.NewTicker(20 * time.Millisecond) // the original checks every second
		defer t.Stop()
		for {
			c.refill()
			select {
			case <-c.ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	c.t.Cleanup(c.stop)
}

func (c *oldClient) stop() {
	c.cancel()
	c.wg.Wait()
	c.hc.CloseIdleConnections()
}

func (c *oldClient) counts() (conns, idle int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.conns, c.idleN
}

// refill opens connections until idle are waiting, within max.
func (c *oldClient) refill() {
	c.mu.Lock()
	n := min(c.idle-c.idleN, c.max-c.conns)
	c.conns += max(n, 0)
	c.idleN += max(n, 0)
	c.mu.Unlock()
	for range n {
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.connection()
			c.mu.Lock()
			c.conns--
			c.ended++
			c.mu.Unlock()
		}()
	}
}

// connection serves requests on one WebSocket until it breaks.
func (c *oldClient) connection() {
	idle := true
	defer func() {
		if idle {
			c.mu.Lock()
			c.idleN--
			c.mu.Unlock()
		}
	}()
	ws, resp, err := websocket.DefaultDialer.DialContext(c.ctx, c.target, http.Header{"X-SECRET-KEY": {c.secret}})
	if err != nil {
		if resp != nil {
			resp.Body.Close()
		}
		return
	}
	defer ws.Close()
	stop := context.AfterFunc(c.ctx, func() { ws.Close() })
	defer stop()
	if ws.WriteMessage(websocket.TextMessage, []byte(legacy.Greeting(c.id, c.idle))) != nil {
		return
	}
	if c.respond != nil {
		c.respond(ws)
		return
	}
	for {
		typ, headMsg, err := ws.ReadMessage()
		if err != nil || typ != websocket.TextMessage {
			return
		}
		// Busy now: the pool opens a replacement.
		c.mu.Lock()
		c.idleN--
		c.mu.Unlock()
		idle = false
		c.refill()
		_, body, err := ws.ReadMessage()
		if err != nil {
			return
		}
		status, hdr, out := c.execute(headMsg, body)
		rh, _ := json.Marshal(legacy.ResponseHead{StatusCode: status, Header: hdr, ContentLength: int64(len(out))})
		if ws.WriteMessage(websocket.TextMessage, rh) != nil || ws.WriteMessage(websocket.BinaryMessage, out) != nil {
			return
		}
		c.mu.Lock()
		c.idleN++
		c.mu.Unlock()
		idle = true
	}
}

func (c *oldClient) execute(headMsg, body []byte) (int, http.Header, []byte) {
	var h legacy.RequestHead
	if err := json.Unmarshal(headMsg, &h); err != nil {
		return legacy.StatusClientError, nil, []byte("bad head")
	}
	req, err := http.NewRequestWithContext(c.ctx, h.Method, h.URL, bytes.NewReader(body))
	if err != nil {
		return legacy.StatusClientError, nil, []byte(err.Error())
	}
	req.Header = h.Header
	if !c.allow(req) {
		return legacy.StatusClientError, nil, []byte("Destination not allowed")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return legacy.StatusClientError, nil, []byte(err.Error())
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, out
}

func legacyServerConfig() config.Server {
	cfg := serverConfig()
	cfg.Timeout = config.Duration(2 * time.Second)
	return cfg
}

func TestOldClientsThroughNewServer(t *testing.T) {
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		sum := sha256.New()
		n, _ := io.Copy(sum, req.Body)
		w.Header().Set("X-Path", req.URL.Path)
		fmt.Fprintf(w, "%s %d %x", req.Method, n, sum.Sum(nil)[:4])
	}))
	r := startServer(t, legacyServerConfig(), nil)
	oc := startOldClient(t, r, "oldie", 3, 20)
	oc.run()
	waitFor(t, "the old client's idle connections", func() bool { return r.sessions() == 3 })

	resp := do(t, r.request(t, "GET", b.URL+"/hello", nil))
	if got := readAll(t, resp.Body); resp.StatusCode != 200 || !strings.HasPrefix(got, "GET 0 ") || resp.Header.Get("X-Path") != "/hello" {
		t.Fatalf("GET: %d %q %v", resp.StatusCode, got, resp.Header)
	}
	body := strings.Repeat("p", 8<<20)
	sum := sha256.Sum256([]byte(body))
	resp = do(t, r.request(t, "POST", b.URL+"/upload", strings.NewReader(body)))
	if got, want := readAll(t, resp.Body), fmt.Sprintf("POST %d %x", 8<<20, sum[:4]); got != want {
		t.Fatalf("POST: %q, want %q", got, want)
	}

	// Many at once: the old client's pool grows up to its max, and every
	// answer goes to its own request.
	var wg sync.WaitGroup
	var bad atomic.Int32
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := r.request(t, "GET", fmt.Sprintf("%s/r/%d", b.URL, i), nil)
			req.Header.Set("X-Proxy-Client", "oldie")
			resp, err := testHTTP.Do(req)
			if err != nil {
				bad.Add(1)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || resp.Header.Get("X-Path") != fmt.Sprintf("/r/%d", i) {
				bad.Add(1)
			}
		}()
	}
	wg.Wait()
	if n := bad.Load(); n != 0 {
		t.Fatalf("%d of 40 concurrent requests failed or got another's answer", n)
	}
	if conns, _ := oc.counts(); conns > 20 {
		t.Fatalf("old client opened %d connections, max 20", conns)
	}
	waitFor(t, "in-flight back to zero", func() bool { return r.inflight() == 0 })
	for _, s := range r.srv.Stats().Sessions {
		if s.Version != "root-gg/wsp" || s.Client != "oldie" {
			t.Fatalf("legacy session listed as %+v", s)
		}
	}
}

func TestOldClientRefusalsAndLimits(t *testing.T) {
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		io.Copy(io.Discard, req.Body)
		if req.URL.Path == "/never" {
			<-req.Context().Done()
		}
	}))
	cfg := legacyServerConfig()
	cfg.MaxMessageBytes = 4096
	cfg.LegacyTimeout = config.Duration(300 * time.Millisecond)
	r := startServer(t, cfg, nil)
	oc := startOldClient(t, r, "oldie", 2, 5)
	oc.allow = func(req *http.Request) bool { return !strings.Contains(req.URL.Path, "forbidden") }
	oc.run()
	waitFor(t, "idle connections", func() bool { return r.sessions() == 2 })

	for _, tc := range []struct {
		path string
		body string
		want int
		code string
	}{
		{"/forbidden", "", 502, "client_error"},
		{"/big", strings.Repeat("x", 5000), 413, "body_too_large"},
		{"/never", "", 504, "destination_timeout"},
	} {
		var rd io.Reader
		if tc.body != "" {
			rd = strings.NewReader(tc.body)
		}
		resp := do(t, r.request(t, "POST", b.URL+tc.path, rd))
		msg := readAll(t, resp.Body)
		if resp.StatusCode != tc.want || resp.Header.Get("X-Wsp-Error") != tc.code {
			t.Fatalf("%s: %d %q %q, want %d %s", tc.path, resp.StatusCode, resp.Header.Get("X-Wsp-Error"), msg, tc.want, tc.code)
		}
	}
	// The connection that never answered was closed; the pool refilled
	// and still serves.
	waitFor(t, "the pool to refill", func() bool { return r.sessions() >= 2 })
	resp := do(t, r.request(t, "GET", b.URL+"/fine", nil))
	if readAll(t, resp.Body); resp.StatusCode != 200 {
		t.Fatalf("after the faults: %d", resp.StatusCode)
	}
	// Neither a WebSocket upgrade nor CONNECT can go to an old client.
	req := r.request(t, "GET", "ws://"+strings.TrimPrefix(b.URL, "http://")+"/ws", nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	resp = do(t, req)
	if msg := readAll(t, resp.Body); resp.StatusCode != 502 || !strings.Contains(msg, "legacy protocol") {
		t.Fatalf("upgrade to an old client: %d %q", resp.StatusCode, msg)
	}
	c, err := net.Dial("tcp", r.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n")
	cresp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: "CONNECT"})
	if err != nil || cresp.StatusCode != 502 {
		t.Fatalf("CONNECT to an old client: %v %v", cresp, err)
	}
}

func TestOldClientOutOfOrderMessage(t *testing.T) {
	r := startServer(t, legacyServerConfig(), nil)
	oc := startOldClient(t, r, "rude", 1, 1)
	oc.respond = func(ws *websocket.Conn) {
		ws.WriteMessage(websocket.BinaryMessage, []byte("unasked"))
		ws.ReadMessage() // until the server closes it
	}
	oc.run()
	// Each connection is dropped as soon as it misbehaves (the old client
	// keeps opening new ones); the server stays up.
	waitFor(t, "three rude connections dropped by the server", func() bool {
		oc.mu.Lock()
		defer oc.mu.Unlock()
		return oc.ended >= 3
	})
	if status, _ := getBody(t, r.url+"/status"); status != 200 {
		t.Fatalf("server unhealthy after protocol violations: %d", status)
	}
}

func TestOldClientWrongSecret(t *testing.T) {
	cfg := legacyServerConfig()
	cfg.SecretKey = "right"
	r := startServer(t, cfg, nil)
	resp, err := http.Get(r.url + "/status")
	if err == nil {
		resp.Body.Close()
	}
	for _, secret := range []string{"", "wrong"} {
		_, resp, err := websocket.DefaultDialer.Dial("ws://"+r.addr+"/register", http.Header{"X-SECRET-KEY": {secret}})
		if err == nil || resp == nil || (resp.StatusCode != 401 && resp.StatusCode != 403) {
			t.Fatalf("secret %q: %v %v", secret, resp, err)
		}
		resp.Body.Close()
	}
	oc := startOldClient(t, r, "oldie", 1, 1)
	oc.secret = "right"
	oc.run()
	waitFor(t, "the old client with the right secret", func() bool { return r.sessions() == 1 })
}

// TestOldConfigFiles: wsp_server.cfg and wsp_client.cfg as root-gg/wsp
// documents them load unchanged; the client's asks for allowany, and says so.
func TestOldConfigFiles(t *testing.T) {
	dir := t.TempDir()
	server := `---
host : 127.0.0.1                    # Address to bind the HTTP server
port : 8080                         # Port to bind the HTTP server
timeout : 1000                      # Time to wait before acquiring a WS connection to forward the request (milliseconds)
idletimeout : 60000                 # Time to wait before closing idle connection when there is enough idle connections (milliseconds)
#blacklist :                        # Forbidden destination ( deny nothing if empty )
# - method : ".*"                   # Applied in order before whitelist
#   url : "^http(s)?://google.*"    # None must match
#   headers :                       # Optinal header check
#     X-CUSTOM-HEADER : "^value$"   #
#whitelist :                        # Allowed destinations  ( allow all if empty )
# - method : "^GET$"                # Applied in order after blacklist
#   url : "^http(s)?://.*$"         # One must match
#   headers :                       # Optinal header check
#     X-CUSTOM-HEADER : "^value$"   #
# secretkey : ThisIsASecret         # secret key that must be set in clients configuration
`
	client := `---
targets :                            # Endpoints to connect to
 - ws://127.0.0.1:8080/register      #
poolidlesize : 10                    # Default number of concurrent open (TCP) connections to keep idle per WSP server
poolmaxsize : 100                    # Maximum number of concurrent open (TCP) connections per WSP server
#blacklist :                         # Forbidden destination ( deny nothing if empty )
# - method : ".*"                    # Applied in order before whitelist
#   url : ".*forbidden.*"            # None must match
#   headers :                        # Optinal header check
#     X-CUSTOM-HEADER : "^value$"    #
#whitelist :                         # Allowed destinations  ( allow all if empty )
# - method : "^GET$"                 # Applied in order after blacklist
#   url : "http(s)?://.*$"           # One must match
#   headers :                        # Optinal header check
#     X-CUSTOM-HEADER : "^value$"    #
# secretkey : ThisIsASecret          # secret key that must match the value set in servers configuration
`
	sp, cp := filepath.Join(dir, "wsp_server.cfg"), filepath.Join(dir, "wsp_client.cfg")
	os.WriteFile(sp, []byte(server), 0o600)
	os.WriteFile(cp, []byte(client), 0o600)
	s, err := config.LoadServer(sp)
	if err == nil {
		err = s.Validate()
	}
	if err != nil || s.Timeout.D() != time.Second || s.IdleTimeout.D() != time.Minute {
		t.Fatalf("wsp_server.cfg: %+v %v", s, err)
	}
	c, err := config.LoadClient(cp)
	if err != nil {
		t.Fatalf("wsp_client.cfg: %v", err)
	}
	if c.PoolIdleSize != 10 || c.PoolMaxSize != 100 || c.Targets[0] != "ws://127.0.0.1:8080/register" {
		t.Fatalf("wsp_client.cfg: %+v", c)
	}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "allowany") {
		t.Fatalf("a client config without a whitelist must be refused naming allowany: %v", err)
	}
}

// TestMixedFleet: an old client and a new one with the same id form one
// pool, and both serve it.
func TestMixedFleet(t *testing.T) {
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		time.Sleep(5 * time.Millisecond) // long enough for requests to overlap
	}))
	r := startServer(t, legacyServerConfig(), nil)
	startClient(t, clientConfig(r, "mix"))
	oc := startOldClient(t, r, "mix", 2, 4)
	oc.run()
	waitFor(t, "both kinds in the pool", func() bool { return r.sessions() == 3 })
	legacySessions := 0
	for _, s := range r.srv.Stats().Sessions {
		if s.Client != "mix" {
			t.Fatalf("session of %q in the pool", s.Client)
		}
		if s.Version == "root-gg/wsp" {
			legacySessions++
		}
	}
	if legacySessions != 2 {
		t.Fatalf("%d legacy sessions, want 2", legacySessions)
	}
	// Concurrent requests spread over the least loaded sessions: the new
	// client's and the old client's.
	var wg sync.WaitGroup
	for range 30 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := r.request(t, "GET", b.URL, nil)
			req.Header.Set("X-Proxy-Client", "mix")
			if resp, err := testHTTP.Do(req); err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					t.Errorf("status %d", resp.StatusCode)
				}
			}
		}()
	}
	wg.Wait()
	var byKind = map[string]int64{}
	for _, s := range r.srv.Stats().Sessions {
		byKind[s.Version] += s.Requests
	}
	if byKind["root-gg/wsp"] == 0 || byKind["dev"] == 0 {
		t.Fatalf("requests served by kind of client: %v; want both", byKind)
	}
}

// TestOldClientGarbage: an old client answering with broken JSON or a
// huge message is disconnected; the others in its pool go on serving.
func TestOldClientGarbage(t *testing.T) {
	for _, tc := range []struct {
		name   string
		answer func(ws *websocket.Conn)
	}{
		{"truncated JSON", func(ws *websocket.Conn) { ws.WriteMessage(websocket.TextMessage, []byte(`{"StatusCode":20`)) }},
		{"garbage", func(ws *websocket.Conn) { ws.WriteMessage(websocket.TextMessage, []byte("\x00\xff garbage")) }},
		{"huge", func(ws *websocket.Conn) { ws.WriteMessage(websocket.BinaryMessage, make([]byte, 200<<10)) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := legacyServerConfig()
			cfg.MaxMessageBytes = 64 << 10
			r := startServer(t, cfg, nil)
			good := startOldClient(t, r, "good", 1, 2)
			good.run()
			bad := startOldClient(t, r, "bad", 1, 1)
			bad.respond = func(ws *websocket.Conn) {
				if _, _, err := ws.ReadMessage(); err != nil { // the head
					return
				}
				ws.ReadMessage() // the body
				tc.answer(ws)
				ws.ReadMessage() // until the server closes it
			}
			bad.run()
			waitFor(t, "both connected", func() bool { return r.sessions() == 2 })
			b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "fine") }))
			req := r.request(t, "GET", b.URL, nil)
			req.Header.Set("X-Proxy-Client", "bad")
			resp := do(t, req)
			if msg := readAll(t, resp.Body); resp.StatusCode != 502 {
				t.Fatalf("broken answer: %d %q", resp.StatusCode, msg)
			}
			req = r.request(t, "GET", b.URL, nil)
			req.Header.Set("X-Proxy-Client", "good")
			resp = do(t, req)
			if got := readAll(t, resp.Body); resp.StatusCode != 200 || got != "fine" {
				t.Fatalf("the other client after the fault: %d %q", resp.StatusCode, got)
			}
		})
	}
}
