package test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"wsp/internal/client"
	"wsp/internal/config"
	"wsp/internal/server"
)

// upgradeRequest is a raw /register upgrade with the given extra headers.
func upgradeRequest(t *testing.T, r *relay, id string, hdr map[string]string) *http.Response {
	req, _ := http.NewRequest("GET", r.url+"/register", nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Sec-WebSocket-Version", "13")
	req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	req.Header.Set("Sec-WebSocket-Protocol", "wsp.v2")
	req.Header.Set("X-Wsp-Client-Id", id)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	return do(t, req)
}

func TestClientTokens(t *testing.T) {
	cfg := serverConfig()
	cfg.Clients = []config.ClientCred{{ID: "dc1", Token: "tok-dc1"}, {ID: "dc2", Token: "tok-dc2"}}
	r := startServer(t, cfg, nil)
	for _, tc := range []struct {
		id, auth string
		want     int
		inBody   string
	}{
		{"dc1", "", 401, "missing credentials"},
		{"dc1", "Bearer nope", 403, "invalid token"},
		{"dc1", "Bearer tok-dc2", 403, `not bound to client id "dc1"`},
	} {
		hdr := map[string]string{}
		if tc.auth != "" {
			hdr["Authorization"] = tc.auth
		}
		resp := upgradeRequest(t, r, tc.id, hdr)
		if body := readAll(t, resp.Body); resp.StatusCode != tc.want || !strings.Contains(body, tc.inBody) || strings.Contains(body, "tok-") {
			t.Errorf("%s with %q: %d %q, want %d %q", tc.id, tc.auth, resp.StatusCode, body, tc.want, tc.inBody)
		}
	}
	ccfg := clientConfig(r, "dc1")
	ccfg.Token = "tok-dc1"
	startClient(t, ccfg)
}

func TestAppAuthAtEveryEntry(t *testing.T) {
	seen := make(chan http.Header, 10)
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		seen <- req.Header.Clone()
		io.WriteString(w, "in")
	}))
	cfg := serverConfig()
	cfg.Auth = config.Auth{Tokens: []string{"app-token"}, Users: map[string]string{"alice": "wonderland"}}
	r := startServer(t, cfg, nil)
	startClient(t, clientConfig(r, "c1"))
	basic := "Basic " + b64("alice:wonderland")

	t.Run("request", func(t *testing.T) {
		for _, tc := range []struct {
			header, value string
			want          int
		}{
			{"", "", 401},
			{"Authorization", "Bearer wrong", 401},
			{"Authorization", "Basic " + b64("alice:wrong"), 401},
			{"Authorization", "Bearer app-token", 200},
			{"Authorization", basic, 200},
			{"Proxy-Authorization", "Bearer app-token", 200},
		} {
			req := r.request(t, "GET", b.URL, nil)
			if tc.header != "" {
				req.Header.Set(tc.header, tc.value)
			}
			resp := do(t, req)
			readAll(t, resp.Body)
			if resp.StatusCode != tc.want {
				t.Fatalf("%s %q: %d, want %d", tc.header, tc.value, resp.StatusCode, tc.want)
			}
			if tc.want == 401 && !strings.Contains(strings.Join(resp.Header.Values("WWW-Authenticate"), ","), "Basic") {
				t.Fatalf("401 without a WWW-Authenticate challenge: %v", resp.Header)
			}
			if tc.want == 200 {
				h := <-seen
				if h.Get("Authorization") != "" || h.Get("Proxy-Authorization") != "" {
					t.Fatalf("credential reached the destination: %v", h)
				}
			}
		}
	})
	t.Run("proxy", func(t *testing.T) {
		for _, tc := range []struct {
			value string
			want  int
		}{{"", 407}, {"Bearer wrong", 407}, {"Bearer app-token", 200}, {basic, 200}} {
			c, err := net.Dial("tcp", r.addr)
			if err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(c, "GET %s/x HTTP/1.1\r\nHost: %s\r\n", b.URL, strings.TrimPrefix(b.URL, "http://"))
			if tc.value != "" {
				fmt.Fprintf(c, "Proxy-Authorization: %s\r\n", tc.value)
			}
			io.WriteString(c, "Connection: close\r\n\r\n")
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			c.Close()
			if resp.StatusCode != tc.want {
				t.Fatalf("%q: %d, want %d", tc.value, resp.StatusCode, tc.want)
			}
			if tc.want == 407 && resp.Header.Get("Proxy-Authenticate") == "" {
				t.Fatalf("407 without Proxy-Authenticate: %v", resp.Header)
			}
			if tc.want == 200 {
				if h := <-seen; h.Get("Proxy-Authorization") != "" {
					t.Fatalf("credential reached the destination: %v", h)
				}
			}
		}
	})
	t.Run("connect", func(t *testing.T) {
		echo := halfCloseEcho(t)
		for _, tc := range []struct {
			value string
			want  int
		}{{"", 407}, {"Bearer wrong", 407}, {"Bearer app-token", 200}} {
			c, err := net.Dial("tcp", r.addr)
			if err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n", echo, echo)
			if tc.value != "" {
				fmt.Fprintf(c, "Proxy-Authorization: %s\r\n", tc.value)
			}
			io.WriteString(c, "\r\n")
			resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: "CONNECT"})
			c.Close()
			if err != nil || resp.StatusCode != tc.want {
				t.Fatalf("%q: %v %v, want %d", tc.value, resp, err, tc.want)
			}
		}
	})
}

func b64(s string) string {
	return base64Std.EncodeToString([]byte(s))
}

func TestMutualTLS(t *testing.T) {
	p := newPKI(t, "wsp")
	cfg := serverConfig()
	cfg.TLS = config.ServerTLS{Cert: p.serverCert, Key: p.serverKey, ClientCA: p.caFile}
	r := startServer(t, cfg, nil)

	// A client without a certificate cannot complete the TLS handshake.
	noCert := clientConfig(r, "c1")
	noCert.Targets = []string{"wss://" + r.addr + "/register"}
	noCert.TLS = config.ClientTLS{CA: p.caFile}
	if err := connectOnce(t, noCert); err == nil {
		t.Fatal("a client without a certificate connected")
	}
	// A client that does not trust the server's CA refuses it, and says why.
	other := newPKI(t, "other")
	wrongCA := noCert
	wrongCA.TLS = config.ClientTLS{CA: other.caFile, Cert: p.clientCert, Key: p.clientKey}
	var logs bytes.Buffer
	if err := connectOnceLogging(t, wrongCA, &logs); err == nil {
		t.Fatal("a client connected to a server whose CA it does not trust")
	}
	if !strings.Contains(logs.String(), "TLS certificate") || !strings.Contains(logs.String(), r.addr) {
		t.Fatalf("certificate error not logged as such, naming the target:\n%s", logs.String())
	}
	// With the CA and a client certificate, it works end to end.
	good := wrongCA
	good.TLS = config.ClientTLS{CA: p.caFile, Cert: p.clientCert, Key: p.clientKey}
	startClient(t, good)
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "over tls") }))
	pool := x509.NewCertPool()
	pool.AddCert(p.ca)
	cert, _ := tls.LoadX509KeyPair(p.clientCert, p.clientKey)
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}}}
	defer hc.CloseIdleConnections()
	req, _ := http.NewRequest("GET", "https://"+r.addr+"/request", nil)
	req.Header.Set("X-Proxy-Destination", b.URL)
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if got := readAll(t, resp.Body); got != "over tls" {
		t.Fatalf("got %q", got)
	}
}

// TestTLSReload: a new certificate is served after ReloadTLS, and the
// session that was up stays up.
func TestTLSReload(t *testing.T) {
	p := newPKI(t, "wsp")
	cfg := serverConfig()
	cfg.TLS = config.ServerTLS{Cert: p.serverCert, Key: p.serverKey}
	r := startServer(t, cfg, nil)
	ccfg := clientConfig(r, "c1")
	ccfg.Targets = []string{"wss://" + r.addr + "/register"}
	ccfg.TLS = config.ClientTLS{CA: p.caFile}
	startClient(t, ccfg)
	served := func() *x509.Certificate {
		c, err := tls.Dial("tcp", r.addr, &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0]
	}
	before := served()
	cert, key := p.issue(t, "server", 99, x509.ExtKeyUsageServerAuth)
	os.Rename(cert, p.serverCert)
	os.Rename(key, p.serverKey)
	if err := r.srv.ReloadTLS(); err != nil {
		t.Fatal(err)
	}
	if after := served(); after.SerialNumber.Cmp(before.SerialNumber) == 0 {
		t.Fatal("the old certificate is still served after ReloadTLS")
	}
	if r.sessions() != 1 {
		t.Fatal("reloading dropped the session")
	}
}

// connectOnce runs a client until it connects or 2 s pass.
func connectOnce(t *testing.T, cfg config.Client) error {
	return connectOnceLogging(t, cfg, io.Discard)
}

func connectOnceLogging(t *testing.T, cfg config.Client, w io.Writer) error {
	c, err := client.New(cfg, slog.New(slog.NewTextHandler(&lockedWriter{w: w}, nil)))
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); c.Run(ctx) }()
	defer func() { cancel(); <-done }()
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		if c.Ready() {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("not connected")
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func TestSlowlorisCutOff(t *testing.T) {
	cfg := serverConfig()
	cfg.HandshakeTimeout = config.Duration(300 * time.Millisecond)
	r := startServer(t, cfg, nil)
	for _, path := range []string{"/register", "/request"} {
		c, err := net.Dial("tcp", r.addr)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\n", path)
		start := time.Now()
		closed := false
		for i := 0; i < 50 && !closed; i++ { // one header byte every 100 ms
			if _, err := io.WriteString(c, "X"); err != nil {
				closed = true
				break
			}
			c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			// An answer (408) before the head is complete, or the end of
			// the connection, both mean the server gave up on it.
			if n, err := c.Read(make([]byte, 1)); n > 0 || (err != nil && !isTimeout(err)) {
				closed = true
			}
		}
		c.Close()
		if d := time.Since(start); !closed || d > 3*time.Second {
			t.Fatalf("%s: trickling headers kept the connection for %v (closed=%v)", path, d, closed)
		}
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

func TestHugeHeadersRefused(t *testing.T) {
	r := startServer(t, serverConfig(), nil)
	req := r.request(t, "GET", "http://127.0.0.1:1/", nil)
	req.Header.Set("X-Big", strings.Repeat("a", 1<<20))
	resp, err := testHTTP.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Fatalf("1 MiB of headers: %d, want 431", resp.StatusCode)
	}
}

func TestSessionAndStreamLimits(t *testing.T) {
	cfg := serverConfig()
	cfg.MaxSessionsPerID = 1
	cfg.MaxStreams = 1
	cfg.Timeout = config.Duration(200 * time.Millisecond)
	r := startServer(t, cfg, nil)
	startClient(t, clientConfig(r, "c1")) // offers poolmaxsize 100; the server allows 1
	resp := upgradeRequest(t, r, "c1", nil)
	if body := readAll(t, resp.Body); resp.StatusCode != 503 || !strings.Contains(body, "maxsessionsperid") {
		t.Fatalf("second session for c1: %d %q", resp.StatusCode, body)
	}
	release := make(chan struct{})
	started := make(chan struct{}, 1)
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.URL.Path == "/hold" {
			w.WriteHeader(200)
			w.(http.Flusher).Flush()
			started <- struct{}{}
			<-release
		}
	}))
	go func() {
		if resp, err := testHTTP.Do(r.request(t, "GET", b.URL+"/hold", nil)); err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}()
	<-started
	resp = do(t, r.request(t, "GET", b.URL+"/other", nil))
	readAll(t, resp.Body)
	close(release)
	if resp.StatusCode != 504 || resp.Header.Get("X-Wsp-Error") != "client_busy" {
		t.Fatalf("second concurrent request with maxstreams 1: %d %q", resp.StatusCode, resp.Header.Get("X-Wsp-Error"))
	}
}

func TestBodyLimit(t *testing.T) {
	cfg := serverConfig()
	cfg.MaxBodyBytes = 1000
	r := startServer(t, cfg, nil)
	startClient(t, clientConfig(r, "c1"))
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		n, _ := io.Copy(io.Discard, req.Body)
		fmt.Fprint(w, n)
	}))
	for _, tc := range []struct {
		size    int
		chunked bool
		want    int
	}{{1000, false, 200}, {1000, true, 200}, {1001, false, 413}, {50000, true, 413}} {
		var body io.Reader = strings.NewReader(strings.Repeat("b", tc.size))
		if tc.chunked {
			body = io.MultiReader(body)
		}
		resp := do(t, r.request(t, "POST", b.URL, body))
		got := readAll(t, resp.Body)
		if resp.StatusCode != tc.want {
			t.Fatalf("%d bytes (chunked=%v): %d %q, want %d", tc.size, tc.chunked, resp.StatusCode, got, tc.want)
		}
	}
}

// TestSecretsNeverLogged drives failed and successful registrations and
// app requests, and checks no secret appears in the server's logs.
func TestSecretsNeverLogged(t *testing.T) {
	var logs bytes.Buffer
	cfg := serverConfig()
	cfg.SecretKey = "shared-s3cret"
	cfg.Clients = []config.ClientCred{{ID: "c1", Token: "client-t0ken"}}
	cfg.Auth = config.Auth{Tokens: []string{"app-t0ken"}, Users: map[string]string{"bob": "b0b-pass"}}
	srv, err := server.New(cfg, slog.New(slog.NewTextHandler(&lockedWriter{w: &logs}, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		t.Fatal(err)
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	r := &relay{t: t, srv: srv, addr: ln.Addr().String(), url: "http://" + ln.Addr().String(), cancel: cancel, done: done}
	upgradeRequest(t, r, "c1", map[string]string{"X-Secret-Key": "shared-s3cret-wrong"})
	upgradeRequest(t, r, "c1", map[string]string{"Authorization": "Bearer client-t0ken-wrong"})
	ccfg := clientConfig(r, "c1")
	ccfg.Token = "client-t0ken"
	startClient(t, ccfg)
	req := r.request(t, "GET", "http://127.0.0.1:1/?token=app-t0ken", nil)
	req.Header.Set("Authorization", "Bearer app-t0ken-wrong")
	readAll(t, do(t, req).Body)
	req = r.request(t, "GET", "http://127.0.0.1:1/?q=x", nil)
	req.Header.Set("Authorization", "Basic "+b64("bob:b0b-pass"))
	readAll(t, do(t, req).Body)
	r.stop()
	for _, secret := range []string{"s3cret", "t0ken", "b0b-pass"} {
		if strings.Contains(logs.String(), secret) {
			t.Fatalf("secret %q in the logs:\n%s", secret, logs.String())
		}
	}
	if !strings.Contains(logs.String(), "register refused") {
		t.Fatalf("refusals not logged:\n%s", logs.String())
	}
}
