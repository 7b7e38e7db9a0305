package test

import (
	"bufio"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/redis/go-redis/v9"

	"wsp/internal/cluster/redistest"
	"wsp/internal/config"
	"wsp/internal/httperr"
	"wsp/internal/rules"
	"wsp/internal/server"
)

const clusterSecret = "cluster-secret-do-not-log"

// startClusterNode runs an in-process server named name with the Redis
// directory rs; mutate adjusts its configuration.
func startClusterNode(t testing.TB, rs *redistest.Server, name string, logs *logBuffer, mutate func(*config.Server)) *relay {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := serverConfig()
	cfg.Timeout = config.Duration(300 * time.Millisecond)
	cfg.Cluster = config.Cluster{Node: name, Redis: rs.URL(), Advertise: "http://" + ln.Addr().String(), Secret: clusterSecret, TTL: config.Duration(2 * time.Second)}
	if mutate != nil {
		mutate(&cfg)
	}
	log := testLogger(t, name)
	if logs != nil {
		log = slog.New(slog.NewTextHandler(io.MultiWriter(logs, &tWriter{t: t}), &slog.HandlerOptions{Level: slog.LevelDebug})).With("component", name)
	}
	return startServerWith(t, cfg, ln, log)
}

// headerEcho answers with the headers a destination saw, as JSON, and
// with the sha256 of the request body.
func headerEcho(t *testing.T) *httptest.Server {
	return backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, _ := io.Copy(h, r.Body)
		json.NewEncoder(w).Encode(map[string]any{
			"path": r.URL.Path, "headers": r.Header, "body": fmt.Sprintf("%d %x", n, h.Sum(nil)),
		})
	}))
}

type echoed struct {
	Path    string      `json:"path"`
	Headers http.Header `json:"headers"`
	Body    string      `json:"body"`
}

// clusterGet sends GET dest through the node at addr for client id (none
// when ""), with extra headers, and returns the answer with its body read.
func clusterGet(t *testing.T, addr, id, dest string, extra http.Header) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest("GET", "http://"+addr+"/request", nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range extra {
		req.Header[k] = v
	}
	req.Header.Set("X-Proxy-Destination", dest)
	if id != "" {
		req.Header.Set("X-Proxy-Client", id)
	}
	resp, err := appFrom2.Do(req)
	if err != nil {
		t.Fatalf("GET %s through %s: %v", dest, addr, err)
	}
	defer resp.Body.Close()
	return resp, readAll(t, resp.Body)
}

// nodeHeaders are the headers of a node-to-node request from node, signed
// with secret at the given time, written from docs/protocol.md.
func nodeHeaders(node, secret string, at time.Time, method, target, client, id string) http.Header {
	m := hmac.New(sha256.New, []byte(secret))
	fmt.Fprintf(m, "wsp-node-v1\n%d\n%s\n%s\n%s\n%s\n%s", at.Unix(), node, method, target, client, id)
	return http.Header{
		"X-Wsp-Cluster-Node": {node},
		"X-Wsp-Cluster-Auth": {fmt.Sprintf("t=%d,mac=%s", at.Unix(), hex.EncodeToString(m.Sum(nil)))},
	}
}

// appFrom2 is an app on 127.0.0.2, so that a destination can tell the
// app's address (X-Forwarded-For) from a node's (127.0.0.1).
var appFrom2 = &http.Client{Transport: &http.Transport{
	DisableKeepAlives: true,
	DialContext:       (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}).DialContext,
}}

// TestClusterForwarding: three in-process nodes share a Redis directory; a
// client holds a session to one of them. Requests reaching any node get to
// it, through every entry point (/request, proxy mode, CONNECT, WebSocket),
// with the app's X-Forwarded-* and X-Request-Id as the first node set them
// and the hop visible in Via, logs, metrics and /api/stats.
func TestClusterForwarding(t *testing.T) {
	rs := redistest.Start(t)
	var logA, logB logBuffer
	a := startClusterNode(t, rs, "node-a", &logA, nil)
	b := startClusterNode(t, rs, "node-b", &logB, nil)
	c := startClusterNode(t, rs, "node-c", nil, nil)
	startClient(t, clientConfig(a, "dc1"))
	dest := headerEcho(t)
	waitFor(t, "node-b to find dc1 in the directory", func() bool {
		resp, _ := clusterGet(t, b.addr, "dc1", dest.URL, nil)
		return resp.StatusCode == 200
	})

	for i, n := range []*relay{a, b, c} {
		id := fmt.Sprintf("req-%d", i)
		resp, body := clusterGet(t, n.addr, "dc1", dest.URL+"/x", http.Header{"X-Forwarded-For": {"203.0.113.7"}, "X-Request-Id": {id}})
		if resp.StatusCode != 200 {
			t.Fatalf("through %s: %d %s", n.addr, resp.StatusCode, body)
		}
		var e echoed
		if err := json.Unmarshal([]byte(body), &e); err != nil {
			t.Fatalf("through %s: %v: %s", n.addr, err, body)
		}
		wantVia := ""
		if n != a {
			wantVia = "1.1 node-a"
		}
		if got := resp.Header.Get("Via"); got != wantVia {
			t.Errorf("through %s: the app got Via %q, want %q", n.addr, got, wantVia)
		}
		if got := resp.Header.Values("X-Request-Id"); len(got) != 1 || got[0] != id {
			t.Errorf("through %s: the app got X-Request-Id %q, want [%s]", n.addr, got, id)
		}
		h := e.Headers
		// The app's own X-Forwarded-For is not trusted (as without a
		// cluster); the app's address is the one the first node saw.
		if got := h.Get("X-Forwarded-For"); got != "127.0.0.2" {
			t.Errorf("through %s: the destination saw X-Forwarded-For %q, want the app's address as the first node saw it, 127.0.0.2", n.addr, got)
		}
		if got := h.Get("X-Forwarded-Host"); got != n.addr {
			t.Errorf("through %s: the destination saw X-Forwarded-Host %q, want %q", n.addr, got, n.addr)
		}
		if got := h.Get("X-Request-Id"); got != id {
			t.Errorf("through %s: the destination saw X-Request-Id %q, want %q", n.addr, got, id)
		}
		for _, name := range []string{"X-Wsp-Cluster-Node", "X-Wsp-Cluster-Auth", "X-Proxy-Client", "X-Proxy-Destination"} {
			if v := h.Get(name); v != "" {
				t.Errorf("through %s: the destination saw %s: %q", n.addr, name, v)
			}
		}
	}

	t.Run("body streams through a node", func(t *testing.T) {
		req := c.request(t, "POST", dest.URL, pattern(7, 3<<20))
		req.Header.Set("X-Proxy-Client", "dc1")
		resp := do(t, req)
		var e echoed
		if err := json.NewDecoder(resp.Body).Decode(&e); err != nil || resp.StatusCode != 200 {
			t.Fatalf("POST: %d %v", resp.StatusCode, err)
		}
		if want := fmt.Sprintf("%d %s", 3<<20, patternSum(7, 3<<20)); e.Body != want {
			t.Fatalf("the destination got %s, want %s", e.Body, want)
		}
	})
	t.Run("proxy mode, client named by the proxy user", func(t *testing.T) {
		hc := proxyClient(t, &relay{url: "http://dc1@" + b.addr}, nil)
		resp, err := hc.Get(dest.URL + "/proxied")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body := readAll(t, resp.Body)
		if resp.StatusCode != 200 || !strings.Contains(body, `"/proxied"`) || resp.Header.Get("Via") != "1.1 node-a" {
			t.Fatalf("%d Via=%q %s", resp.StatusCode, resp.Header.Get("Via"), body)
		}
	})
	t.Run("CONNECT through a node", func(t *testing.T) {
		echo := halfCloseEcho(t)
		conn, err := net.Dial("tcp", c.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		fmt.Fprintf(conn, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nX-Proxy-Client: dc1\r\n\r\n", echo, echo)
		br := bufio.NewReader(conn)
		resp, err := http.ReadResponse(br, &http.Request{Method: "CONNECT"})
		if err != nil || resp.StatusCode != 200 || resp.Header.Get("Via") != "1.1 node-a" {
			t.Fatalf("CONNECT: %v %v", resp, err)
		}
		io.WriteString(conn, "one\ntwo\n")
		conn.(*net.TCPConn).CloseWrite()
		if got, err := io.ReadAll(br); err != nil || string(got) != "two\none\n" {
			t.Fatalf("got %q, %v", got, err)
		}
	})
	t.Run("WebSocket through a node", func(t *testing.T) {
		ws := wsEcho(t)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, resp, err := websocket.Dial(ctx, "ws://"+b.addr+"/request", &websocket.DialOptions{
			HTTPHeader: http.Header{"X-Proxy-Destination": {"ws" + strings.TrimPrefix(ws.URL, "http") + "/echo"}, "X-Proxy-Client": {"dc1"}},
		})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.CloseNow()
		if via := resp.Header.Get("Via"); via != "1.1 node-a" {
			t.Errorf("upgrade answer Via %q", via)
		}
		echoMessages(t, conn, 100)
	})
	t.Run("a request naming no client goes to a node holding one", func(t *testing.T) {
		// node-b learns at its next heartbeat (a third of the ttl) which
		// nodes hold clients.
		waitFor(t, "node-b to forward an any-client request", func() bool {
			resp, _ := clusterGet(t, b.addr, "", dest.URL+"/any", nil)
			return resp.StatusCode == 200 && resp.Header.Get("Via") == "1.1 node-a"
		})
	})
	t.Run("a client no node holds", func(t *testing.T) {
		resp, body := clusterGet(t, b.addr, "nobody", dest.URL, nil)
		if resp.StatusCode != 503 || resp.Header.Get(httperr.Header) != httperr.NoClient ||
			!strings.Contains(body, `no client with id "nobody" is connected to any node`) {
			t.Fatalf("%d %s: %s", resp.StatusCode, resp.Header.Get(httperr.Header), body)
		}
	})

	// The hop is visible: access logs on both sides, metrics, /api/stats.
	waitFor(t, "access lines", func() bool {
		return strings.Contains(logB.String(), "node=node-a") && strings.Contains(logA.String(), "via=node-b")
	})
	sb, sa := b.srv.Stats().Cluster, a.srv.Stats().Cluster
	if sb == nil || sb.Forwarded == 0 || sa == nil || sa.Received == 0 {
		t.Fatalf("stats: node-b %+v, node-a %+v", sb, sa)
	}
	if !sa.Up || sa.Held != 1 || sa.Node != "node-a" {
		t.Fatalf("node-a's directory status: %+v", sa.Status)
	}
	waitFor(t, "node-a's next heartbeat to list the three nodes", func() bool { return len(a.srv.Stats().Cluster.Nodes) == 3 })
	metrics := scrape(t, b.srv)
	for _, want := range []string{`wsp_cluster_forwarded_total{result="ok"}`, `wsp_cluster_directory_up 1`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("node-b's metrics lack %s", want)
		}
	}
	if !strings.Contains(scrape(t, a.srv), `wsp_cluster_received_total{result="accepted"}`) {
		t.Error("node-a's metrics lack wsp_cluster_received_total")
	}
	for _, l := range []string{logA.String(), logB.String()} {
		if strings.Contains(l, clusterSecret) {
			t.Fatal("the cluster secret was logged")
		}
	}
}

// scrape returns a server's /metrics text.
func scrape(t *testing.T, s *server.Server) string {
	t.Helper()
	rec := httptest.NewRecorder()
	s.AdminHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	return rec.Body.String()
}

// TestClusterNodeRequests: a node-to-node request must carry the cluster
// secret; with it, the receiving node trusts the app authentication the
// first node did, still applies its own rules, and never forwards again.
func TestClusterNodeRequests(t *testing.T) {
	rs := redistest.Start(t)
	var logA, logB logBuffer
	auth := func(cfg *config.Server) {
		cfg.Auth = config.Auth{Tokens: []string{"app-token"}}
		cfg.Blacklist = []rules.Spec{{URL: "/forbidden"}}
	}
	a := startClusterNode(t, rs, "node-a", &logA, auth)
	b := startClusterNode(t, rs, "node-b", &logB, func(cfg *config.Server) { cfg.Auth = config.Auth{Tokens: []string{"app-token"}} })
	plain := startServer(t, serverConfig(), nil)
	startClient(t, clientConfig(a, "dc1"))
	var hits atomic.Int64
	dest := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		io.WriteString(w, "reached")
	}))

	nodeGet := func(r *relay, path string, h http.Header) (*http.Response, string) {
		return clusterGet(t, r.addr, "dc1", dest.URL+path, h)
	}
	// signed is the node headers of node's GET of path, signed with secret
	// as docs/protocol.md says.
	signed := func(node, secret, path string) http.Header {
		return nodeHeaders(node, secret, time.Now(), "GET", dest.URL+path, "dc1", "")
	}
	for _, tc := range []struct {
		name   string
		to     *relay
		header http.Header
		status int
		code   string
		msg    string
	}{
		{"no signature", a, http.Header{"X-Wsp-Cluster-Node": {"node-b"}}, 401, httperr.Unauthorized, "without X-Wsp-Cluster-Auth"},
		{"signed with a wrong secret", a, signed("node-b", "guess", "/ok"), 403, httperr.Forbidden, "wrong signature"},
		{"signed for another request", a, signed("node-b", clusterSecret, "/other"), 403, httperr.Forbidden, "wrong signature"},
		{"a signature without a node name", a, http.Header{"X-Wsp-Cluster-Auth": signed("node-b", clusterSecret, "/ok")["X-Wsp-Cluster-Auth"]}, 400, httperr.BadRequest, "naming the node"},
		{"a server that is no cluster node", plain, signed("node-b", clusterSecret, "/ok"), 403, httperr.Forbidden, "cluster.redis is not set"},
		{"the receiving node's rules", a, signed("node-b", clusterSecret, "/forbidden"), 403, httperr.ServerRefused, "refused by the server's rules"},
	} {
		path := "/ok"
		if tc.code == httperr.ServerRefused {
			path = "/forbidden"
		}
		resp, body := nodeGet(tc.to, path, tc.header)
		if resp.StatusCode != tc.status || resp.Header.Get(httperr.Header) != tc.code || !strings.Contains(body, tc.msg) {
			t.Errorf("%s: %d %s %q, want %d %s containing %q", tc.name, resp.StatusCode, resp.Header.Get(httperr.Header), body, tc.status, tc.code, tc.msg)
		}
	}
	if n := hits.Load(); n != 0 {
		t.Fatalf("%d refused node requests reached the destination", n)
	}

	// Signed, no app credential is needed: node-b checked it.
	resp, body := nodeGet(a, "/ok", signed("node-b", clusterSecret, "/ok"))
	if resp.StatusCode != 200 || body != "reached" {
		t.Fatalf("authenticated node request: %d %s", resp.StatusCode, body)
	}
	// An app must authenticate at the node it reaches.
	resp, body = nodeGet(b, "/ok", nil)
	if resp.StatusCode != 401 {
		t.Fatalf("app without credentials through node-b: %d %s", resp.StatusCode, body)
	}
	waitFor(t, "node-b forwarding for an authenticated app", func() bool {
		resp, body := nodeGet(b, "/ok", http.Header{"Authorization": {"Bearer app-token"}})
		return resp.StatusCode == 200 && body == "reached" && resp.Header.Get("Via") == "1.1 node-a"
	})

	// No loop: a node request for a client the receiving node does not
	// hold is served there or refused, never forwarded again, although the
	// directory names node-a.
	received := a.srv.Stats().Cluster.Received
	resp, body = nodeGet(b, "/ok", signed("node-c", clusterSecret, "/ok"))
	if resp.StatusCode != 503 || resp.Header.Get(httperr.Header) != httperr.NoClient || resp.Header.Get("Via") != "" {
		t.Fatalf("node request for a client held elsewhere: %d %s Via=%q %s", resp.StatusCode, resp.Header.Get(httperr.Header), resp.Header.Get("Via"), body)
	}
	if got := a.srv.Stats().Cluster.Received; got != received {
		t.Fatalf("node-b forwarded a node request to node-a (received %d -> %d)", received, got)
	}
	if !strings.Contains(scrape(t, a.srv), `wsp_cluster_received_total{result="refused"} 4`) {
		t.Error(`node-a's metrics lack wsp_cluster_received_total{result="refused"} 4`)
	}
	if l := logA.String(); !strings.Contains(l, "node request refused") || strings.Contains(l, clusterSecret) || strings.Contains(l, "guess") {
		t.Fatalf("node-a's log must record refusals without secrets:\n%s", l)
	}
}

// TestClusterDrainWithdrawsFirst: a draining node marks itself draining in
// the directory first thing, while it still serves (drainnotice): other
// nodes stop sending it requests another node can serve, and still send it
// those for clients only it holds. When it stops, its entries go.
func TestClusterDrainWithdrawsFirst(t *testing.T) {
	rs := redistest.Start(t)
	a := startClusterNode(t, rs, "node-a", nil, func(cfg *config.Server) { cfg.DrainNotice = config.Duration(3 * time.Second) })
	b := startClusterNode(t, rs, "node-b", nil, nil)
	c := startClusterNode(t, rs, "node-c", nil, nil)
	startClient(t, clientConfig(a, "dc1")) // held by node-a only
	startClient(t, clientConfig(a, "dc2")) // held by node-a and node-c
	startClient(t, clientConfig(c, "dc2"))
	dest := backend(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") }))
	waitFor(t, "forwarding through node-b", func() bool {
		r1, _ := clusterGet(t, b.addr, "dc1", dest.URL, nil)
		r2, _ := clusterGet(t, b.addr, "dc2", dest.URL, nil)
		return r1.StatusCode == 200 && r2.StatusCode == 200
	})
	rc := redis.NewClient(&redis.Options{Addr: rs.Addr(), Protocol: 2, DisableIdentity: true})
	defer rc.Close()
	ctx := context.Background()
	stopped := make(chan error, 1)
	go func() { stopped <- a.stop() }()
	took, ok := pollUntil(2*time.Second, func() bool { return rc.HGet(ctx, "wsp:node:node-a", "draining").Val() == "1" })
	if !ok {
		t.Fatal("node-a is not marked draining in the directory 2s into its drain")
	}
	t.Logf("node-a marked itself draining %s into its drain", took)
	// During the drain notice: node-a still serves its own sessions, and
	// node-b still forwards it what only it can serve, the rest elsewhere.
	if resp, body := clusterGet(t, a.addr, "dc1", dest.URL, nil); resp.StatusCode != 200 {
		t.Fatalf("node-a during its drain notice: %d %s", resp.StatusCode, body)
	}
	if resp, body := clusterGet(t, b.addr, "dc1", dest.URL, nil); resp.StatusCode != 200 || resp.Header.Get("Via") != "1.1 node-a" {
		t.Fatalf("node-b for a client only the draining node holds: %d Via=%q %s", resp.StatusCode, resp.Header.Get("Via"), body)
	}
	for i := range 8 {
		if resp, body := clusterGet(t, b.addr, "dc2", dest.URL, nil); resp.StatusCode != 200 || resp.Header.Get("Via") != "1.1 node-c" {
			t.Fatalf("request %d from node-b for a client node-c holds too: %d Via=%q %s", i, resp.StatusCode, resp.Header.Get("Via"), body)
		}
	}
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
	if rc.Exists(ctx, "wsp:node:node-a").Val() != 0 || rc.ZScore(ctx, "wsp:client:dc1", "node-a").Err() != redis.Nil {
		t.Fatal("node-a's entries are still in the directory after it stopped")
	}
}

// TestClusterShutdownEndsForwardedTunnels: a node's CONNECT tunnels and
// WebSocket upgrades through another node last through its drain, as its
// own do, and then end, with idletimeout 0: its Serve waits for them
// within drain, closes them, and returns.
func TestClusterShutdownEndsForwardedTunnels(t *testing.T) {
	rs := redistest.Start(t)
	for _, kind := range []string{"CONNECT", "WebSocket"} {
		t.Run(kind, func(t *testing.T) {
			noIdle := func(cfg *config.Server) {
				cfg.IdleTimeout = 0
				cfg.Drain = config.Duration(time.Second)
			}
			a := startClusterNode(t, rs, "node-a-"+kind, nil, noIdle)
			b := startClusterNode(t, rs, "node-b-"+kind, nil, noIdle)
			startClient(t, clientConfig(a, "dc-"+kind))
			dest := headerEcho(t)
			waitFor(t, "node-b to find the client in the directory", func() bool {
				resp, _ := clusterGet(t, b.addr, "dc-"+kind, dest.URL, nil)
				return resp.StatusCode == 200
			})
			var echo func() error // a round trip through the tunnel
			var closed func() error
			if kind == "CONNECT" {
				echo, closed = connectThrough(t, b.addr, "dc-"+kind)
			} else {
				echo, closed = webSocketThrough(t, b.addr, "dc-"+kind)
			}
			if err := echo(); err != nil {
				t.Fatal(err)
			}
			stopped := make(chan error, 1)
			go func() { stopped <- b.stop() }()
			waitFor(t, "node-b to stop listening", func() bool {
				c, err := net.DialTimeout("tcp", b.addr, time.Second)
				if err == nil {
					c.Close()
				}
				return err != nil
			})
			if err := echo(); err != nil {
				t.Fatalf("the tunnel during node-b's drain: %v", err)
			}
			select {
			case err := <-stopped:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(5 * time.Second):
				closed() // lets it stop
				t.Fatal("node-b did not stop within 5s: it waits for a tunnel through node-a")
			}
			if err := closed(); err != nil {
				t.Fatalf("after node-b stopped: %v", err)
			}
		})
	}
}

// connectThrough opens a CONNECT tunnel for client id through the node at
// addr to a TCP echo; it returns a round trip through the tunnel, and a
// check that the tunnel ends within a few seconds, which closes it.
func connectThrough(t *testing.T, addr, id string) (echo, closed func() error) {
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
				io.Copy(c, c)
			})
		}
	})
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		ln.Close()
		wg.Wait()
	})
	fmt.Fprintf(conn, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nX-Proxy-Client: %s\r\n\r\n", ln.Addr(), ln.Addr(), id)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, &http.Request{Method: "CONNECT"})
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %v %v", resp, err)
	}
	echo = func() error {
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(conn, "ping\n")
		if line, err := br.ReadString('\n'); err != nil || line != "ping\n" {
			return fmt.Errorf("through the tunnel: %q, %v", line, err)
		}
		return nil
	}
	closed = func() error {
		defer conn.Close()
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := io.Copy(io.Discard, br); err != nil {
			return fmt.Errorf("the tunnel is still open (read %d bytes): %v", n, err)
		}
		return nil
	}
	return echo, closed
}

// webSocketThrough is connectThrough for a WebSocket to an echo server.
func webSocketThrough(t *testing.T, addr, id string) (echo, closed func() error) {
	t.Helper()
	ws := wsEcho(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, "ws://"+addr+"/request", &websocket.DialOptions{
		HTTPHeader: http.Header{"X-Proxy-Destination": {"ws" + strings.TrimPrefix(ws.URL, "http") + "/echo"}, "X-Proxy-Client": {id}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.CloseNow() })
	echo = func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := conn.Write(ctx, websocket.MessageText, []byte("ping")); err != nil {
			return err
		}
		if _, got, err := conn.Read(ctx); err != nil || string(got) != "ping" {
			return fmt.Errorf("through the WebSocket: %q, %v", got, err)
		}
		return nil
	}
	closed = func() error {
		defer conn.CloseNow()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, _, err := conn.Read(ctx); err == nil || ctx.Err() != nil {
			return fmt.Errorf("the WebSocket is still open: %v", err)
		}
		return nil
	}
	return echo, closed
}

// TestClusterDestinationCannotFakeNodeAnswers: a destination answering
// what a node answers when it lost its client (503 no_client, marked as
// the node's own) has its answer passed on, and the request is not sent
// to the client's other node: it ran once, and must not run twice.
func TestClusterDestinationCannotFakeNodeAnswers(t *testing.T) {
	rs := redistest.Start(t)
	a := startClusterNode(t, rs, "node-a", nil, nil)
	b := startClusterNode(t, rs, "node-b", nil, nil)
	c := startClusterNode(t, rs, "node-c", nil, nil)
	startClient(t, clientConfig(a, "dc1"))
	startClient(t, clientConfig(c, "dc1"))
	var hits atomic.Int64
	dest := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/fake" {
			hits.Add(1)
			w.Header().Set("X-Wsp-Error", httperr.NoClient)
			w.Header().Set("X-Wsp-Cluster-Node", "node-a")
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	waitFor(t, "node-b to forward to both holders", func() bool {
		seen := map[string]bool{}
		for range 20 {
			resp, _ := clusterGet(t, b.addr, "dc1", dest.URL, nil)
			seen[resp.Header.Get("Via")] = true
		}
		return seen["1.1 node-a"] && seen["1.1 node-c"]
	})
	for i := range 10 {
		before := hits.Load()
		resp, _ := clusterGet(t, b.addr, "dc1", dest.URL+"/fake", nil)
		if resp.StatusCode != 503 || hits.Load() != before+1 {
			t.Fatalf("request %d: %d, the destination got it %d times", i, resp.StatusCode, hits.Load()-before)
		}
		if v := resp.Header.Get("X-Wsp-Cluster-Node"); v != "" {
			t.Fatalf("the app got X-Wsp-Cluster-Node %q", v)
		}
	}
}

// rrBalancer is a minimal round-robin TCP load balancer, as in front of a
// real cluster: each connection goes to the next backend that accepts it.
type rrBalancer struct {
	ln       net.Listener
	backends []string
	next     atomic.Uint64
	wg       sync.WaitGroup
	mu       sync.Mutex
	conns    map[net.Conn]bool // guarded by mu
	closed   bool              // guarded by mu
}

func startRRBalancer(t *testing.T, backends ...string) *rrBalancer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lb := &rrBalancer{ln: ln, backends: backends, conns: map[net.Conn]bool{}}
	lb.wg.Add(1)
	go func() {
		defer lb.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if !lb.track(c) {
				c.Close()
				return
			}
			lb.wg.Add(1)
			go func() {
				defer lb.wg.Done()
				lb.serve(c)
			}()
		}
	}()
	t.Cleanup(lb.close)
	return lb
}

func (lb *rrBalancer) track(cs ...net.Conn) bool {
	lb.mu.Lock()
	defer lb.mu.Unlock()
	if lb.closed {
		return false
	}
	for _, c := range cs {
		lb.conns[c] = true
	}
	return true
}

func (lb *rrBalancer) serve(in net.Conn) {
	defer func() {
		lb.mu.Lock()
		delete(lb.conns, in)
		lb.mu.Unlock()
		in.Close()
	}()
	var out net.Conn
	for range lb.backends {
		be := lb.backends[lb.next.Add(1)%uint64(len(lb.backends))]
		if c, err := net.DialTimeout("tcp", be, time.Second); err == nil {
			out = c
			break
		}
	}
	if out == nil || !lb.track(out) {
		if out != nil {
			out.Close()
		}
		return
	}
	defer func() {
		lb.mu.Lock()
		delete(lb.conns, out)
		lb.mu.Unlock()
		out.Close()
	}()
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		io.Copy(dst, src)
		dst.(*net.TCPConn).CloseWrite()
		done <- struct{}{}
	}
	go pipe(out, in)
	go pipe(in, out)
	<-done
	// One direction ended: a backend that died takes its client's
	// connection with it, as a real balancer's would.
	in.Close()
	out.Close()
	<-done
}

func (lb *rrBalancer) close() {
	lb.mu.Lock()
	lb.closed = true
	for c := range lb.conns {
		c.Close()
	}
	lb.mu.Unlock()
	lb.ln.Close()
	lb.wg.Wait()
}

// peakRSS reads a process's peak resident set size (VmHWM) from /proc.
func peakRSS(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Skipf("no /proc to measure memory: %v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatalf("VmHWM %q: %v", v, err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc status")
	return 0
}

// clusterProc is a `wsp server` process, one node of the cluster.
type clusterProc struct {
	name  string
	addr  string
	admin string
	p     *wspProcess
}

// stats reads the node's /api/stats (nil when it does not answer).
func (n *clusterProc) stats() *server.Stats {
	resp, err := clusterHTTP.Get("http://" + n.admin + "/api/stats")
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	var st server.Stats
	if json.NewDecoder(resp.Body).Decode(&st) != nil {
		return nil
	}
	return &st
}

// clusterHTTP is an app's HTTP client with a bound on every request, so a
// wait on a dead node cannot hang the test.
var clusterHTTP = &http.Client{
	Timeout:   20 * time.Second,
	Transport: &http.Transport{DisableKeepAlives: true, DisableCompression: true},
}

// via sends GET dest for dc1 through the node at addr.
func via(addr, dest string) (int, string, string, error) {
	req, err := http.NewRequest("GET", "http://"+addr+"/request", nil)
	if err != nil {
		return 0, "", "", err
	}
	req.Header.Set("X-Proxy-Destination", dest)
	req.Header.Set("X-Proxy-Client", "dc1")
	resp, err := clusterHTTP.Do(req)
	if err != nil {
		return 0, "", "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header.Get("Via"), err
}

// TestClusterProcessesBehindLoadBalancer: three `wsp server` processes with
// one Redis directory behind a round-robin load balancer; one `wsp client`
// process connects through the balancer to one of them. Any node serves
// its requests; 256 MiB stream through a node that does not hold it in
// bounded memory; when the holder is killed, the client reconnects through
// the balancer to another node and every node serves again within the TTL
// and the client's back-off; when Redis restarts empty, heartbeats rebuild
// the directory.
func TestClusterProcessesBehindLoadBalancer(t *testing.T) {
	if testing.Short() {
		t.Skip("runs four processes and moves 512 MiB")
	}
	rs := redistest.Start(t)
	const ttl = 2 * time.Second
	var nodes []*clusterProc
	var addrs []string
	for _, name := range []string{"node-a", "node-b", "node-c"} {
		port, admin := redistest.FreePort(t), redistest.FreePort(t)
		yaml := fmt.Sprintf(`host: 127.0.0.1
port: %d
admin: 127.0.0.1:%d
timeout: 500ms
keepalive: 1s
drain: 2s
cluster:
  node: %s
  redis: %s
  advertise: http://127.0.0.1:%d
  secret: %s
  ttl: %s
`, port, admin, name, rs.URL(), port, clusterSecret, ttl)
		p := startWsp(t, "server", yaml)
		n := &clusterProc{name: name, addr: p.listening(t), admin: fmt.Sprintf("127.0.0.1:%d", admin), p: p}
		nodes = append(nodes, n)
		addrs = append(addrs, n.addr)
	}
	lb := startRRBalancer(t, addrs...)
	startWsp(t, "client", fmt.Sprintf("id: dc1\ntargets: [ws://%s/register]\nallowany: true\nkeepalive: 1s\ndiscovery: 0\n", lb.ln.Addr()))

	dest := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/big" && r.Method == "GET":
			w.Header().Set("Content-Length", strconv.FormatInt(bigSize(), 10))
			io.Copy(w, pattern(3, bigSize()))
		case r.URL.Path == "/big":
			h := sha256.New()
			n, err := io.Copy(h, r.Body)
			if err != nil {
				http.Error(w, err.Error(), 500)
				return
			}
			fmt.Fprintf(w, "%d %x", n, h.Sum(nil))
		default:
			io.WriteString(w, "hello from the private network")
		}
	}))

	// owner is the node holding the client's session, by its /api/stats.
	owner := func(among []*clusterProc) *clusterProc {
		for _, n := range among {
			if st := n.stats(); st != nil && st.Clients == 1 {
				return n
			}
		}
		return nil
	}
	var own *clusterProc
	waitFor(t, "the client's session on one node", func() bool { own = owner(nodes); return own != nil })
	t.Logf("the client holds its session on %s", own.name)

	// Every node serves it.
	allServe := func(among []*clusterProc, holder *clusterProc) bool {
		for _, n := range among {
			status, body, v, err := via(n.addr, dest.URL+"/small")
			if err != nil || status != 200 || body != "hello from the private network" {
				return false
			}
			if want := "1.1 " + holder.name; n != holder && v != want {
				t.Fatalf("through %s: Via %q, want %q", n.name, v, want)
			}
		}
		return true
	}
	waitFor(t, "every node to serve dc1", func() bool { return allServe(nodes, own) })

	// 256 MiB each way through a node that does not hold the client.
	var other *clusterProc
	for _, n := range nodes {
		if n != own {
			other = n
			break
		}
	}
	before := peakRSS(t, other.p.cmd.Process.Pid)
	start := time.Now()
	req, _ := http.NewRequest("GET", "http://"+other.addr+"/request", nil)
	req.Header.Set("X-Proxy-Destination", dest.URL+"/big")
	req.Header.Set("X-Proxy-Client", "dc1")
	resp := do(t, req)
	h := sha256.New()
	n, err := io.Copy(h, resp.Body)
	if err != nil || n != bigSize() || hex.EncodeToString(h.Sum(nil)) != patternSum(3, bigSize()) || resp.Header.Get("Via") != "1.1 "+own.name {
		t.Fatalf("download through %s: %d bytes, %v, Via %q", other.name, n, err, resp.Header.Get("Via"))
	}
	down := time.Since(start)
	start = time.Now()
	req, _ = http.NewRequest("PUT", "http://"+other.addr+"/request", pattern(4, bigSize()))
	req.Header.Set("X-Proxy-Destination", dest.URL+"/big")
	req.Header.Set("X-Proxy-Client", "dc1")
	resp = do(t, req)
	if got, want := readAll(t, resp.Body), fmt.Sprintf("%d %s", bigSize(), patternSum(4, bigSize())); resp.StatusCode != 200 || got != want {
		t.Fatalf("upload through %s: %d %q, want %q", other.name, resp.StatusCode, got, want)
	}
	up := time.Since(start)
	growth := peakRSS(t, other.p.cmd.Process.Pid) - before
	t.Logf("through %s, not holding the client: %d MiB down in %s (%.0f MiB/s), up in %s (%.0f MiB/s); its peak RSS grew %.1f MiB",
		other.name, bigSize()>>20, down.Round(time.Millisecond), float64(bigSize()>>20)/down.Seconds(),
		up.Round(time.Millisecond), float64(bigSize()>>20)/up.Seconds(), float64(growth)/(1<<20))
	if growth > memoryBound {
		t.Fatalf("the forwarding node's peak RSS grew %d MiB, bound %d MiB", growth>>20, memoryBound>>20)
	}

	// Kill the holder: the client reconnects through the balancer to
	// another node; every node left serves again within the TTL plus the
	// client's back-off.
	own.p.cmd.Process.Kill()
	<-own.p.exited
	killed := time.Now()
	var alive []*clusterProc
	for _, n := range nodes {
		if n != own {
			alive = append(alive, n)
		}
	}
	var newOwn *clusterProc
	bound := ttl + 8*time.Second
	took, ok := pollUntil(bound, func() bool {
		if newOwn = owner(alive); newOwn == nil {
			return false
		}
		return allServe(alive, newOwn)
	})
	if !ok {
		t.Fatalf("%s after killing %s, the nodes left do not all serve dc1", bound, own.name)
	}
	t.Logf("killed %s: the client is back on %s and every node left serves after %s", own.name, newOwn.name, took.Round(time.Millisecond))
	if since := time.Since(killed); since > bound {
		t.Fatalf("recovery took %s, bound %s", since, bound)
	}

	// Redis restarts empty: the heartbeats rebuild the directory.
	rs.Restart()
	rc := redis.NewClient(&redis.Options{Addr: rs.Addr(), Protocol: 2, DisableIdentity: true})
	defer rc.Close()
	took, ok = pollUntil(10*time.Second, func() bool {
		return rc.ZScore(context.Background(), "wsp:client:dc1", newOwn.name).Err() == nil && allServe(alive, newOwn)
	})
	if !ok {
		t.Fatal("10s after Redis restarted, the directory is not rebuilt or a node does not serve dc1")
	}
	t.Logf("Redis restarted empty: rebuilt and serving again after %s", took.Round(time.Millisecond))
	if st := newOwn.stats(); st == nil || st.Cluster == nil || !st.Cluster.Up || st.Cluster.Held != 1 {
		t.Fatalf("%s's directory status after the restart: %+v", newOwn.name, st)
	}
}

// BenchmarkClusterSmallGet measures the latency of small GETs, one at a
// time, sent to the node holding the client (local) and to another node
// (forwarded: a directory lookup and one more HTTP hop), all in one process.
func BenchmarkClusterSmallGet(b *testing.B) {
	rs := redistest.Start(b)
	a := startClusterNode(b, rs, "node-a", nil, func(cfg *config.Server) { cfg.Timeout = config.Duration(2 * time.Second) })
	other := startClusterNode(b, rs, "node-b", nil, nil)
	startClient(b, clientConfig(a, "dc1"))
	be := backend(b, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "a small answer, like most API calls give")
	}))
	tr := &http.Transport{MaxIdleConnsPerHost: 256}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	get := func(addr string) error {
		req, _ := http.NewRequest("GET", "http://"+addr+"/request", nil)
		req.Header.Set("X-Proxy-Destination", be.URL+"/small")
		req.Header.Set("X-Proxy-Client", "dc1")
		resp, err := hc.Do(req)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("through %s: status %d", addr, resp.StatusCode)
		}
		return nil
	}
	waitFor(b, "forwarding", func() bool { return get(other.addr) == nil })
	for _, bc := range []struct {
		name string
		addr string
	}{{"local", a.addr}, {"forwarded", other.addr}} {
		b.Run(bc.name, func(b *testing.B) {
			for range b.N {
				if err := get(bc.addr); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
