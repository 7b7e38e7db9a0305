package test

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"wsp/internal/config"
	"wsp/internal/rules"
)

// TestErrorStatuses walks the spec's error table: each failure answers with
// its status, X-Wsp-Error code and a one-line body saying what and where.
func TestErrorStatuses(t *testing.T) {
	release := make(chan struct{})
	slowStarted := make(chan struct{}, 1)
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		switch req.URL.Path {
		case "/slow":
			// Headers now (within the client's header timeout), body later.
			w.WriteHeader(200)
			w.(http.Flusher).Flush()
			slowStarted <- struct{}{}
			select {
			case <-release:
			case <-req.Context().Done():
			}
		case "/hang":
			select {
			case <-time.After(5 * time.Second):
			case <-req.Context().Done():
			}
		}
		io.WriteString(w, "ok")
	}))
	closed := closedPort(t)

	scfg := serverConfig()
	scfg.Timeout = config.Duration(300 * time.Millisecond)
	scfg.Blacklist = []rules.Spec{{URL: "/server-forbidden"}}
	r := startServer(t, scfg, nil)
	ccfg := clientConfig(r, "c1")
	ccfg.AllowAny = false
	ccfg.Whitelist = []rules.Spec{{URL: "^" + b.URL + "/"}, {URL: "^http://" + closed + "/"}}
	ccfg.HeaderTimeout = config.Duration(300 * time.Millisecond)
	ccfg.PoolMaxSize = 1
	startClient(t, ccfg)

	// Occupy the client's only stream for the "busy" case below.
	busyCtx, stopBusy := context.WithCancel(context.Background())
	defer stopBusy()

	cases := []struct {
		name       string
		dest       string
		clientID   string
		occupy     bool
		wantStatus int
		wantCode   string
		wantInBody string
	}{
		{"missing destination", "", "", false, 400, "bad_destination", "X-Proxy-Destination"},
		{"relative destination", "/just/a/path", "", false, 400, "bad_destination", "not an absolute URL"},
		{"bad scheme", "ftp://example.com/", "", false, 400, "bad_destination", "scheme"},
		{"server rule", b.URL + "/server-forbidden", "", false, 403, "server_refused", "server"},
		{"no client's advertised rules accept", "http://10.255.255.1/x", "", false, 403, "client_refused", "every connected client"},
		{"client rule, client named", "http://10.255.255.1/x", "c1", false, 403, "client_refused", `client "c1"`},
		{"destination refuses connections", "http://" + closed + "/x", "", false, 502, "dial_failed", closed},
		{"unknown client id", b.URL + "/x", "nobody", false, 503, "no_client", `"nobody"`},
		{"destination too slow", b.URL + "/hang", "", false, 504, "destination_timeout", "did not answer in time"},
		{"client at its stream limit", b.URL + "/x", "", true, 504, "client_busy", "limit"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.occupy {
				go func() {
					req := r.request(t, "GET", b.URL+"/slow", nil).WithContext(busyCtx)
					if resp, err := testHTTP.Do(req); err == nil {
						io.Copy(io.Discard, resp.Body) // holds the stream until released
						resp.Body.Close()
					}
				}()
				<-slowStarted // the client's only stream is in use
			}
			req := r.request(t, "GET", tc.dest, nil)
			if tc.dest == "" {
				req.Header.Del("X-Proxy-Destination")
			}
			if tc.clientID != "" {
				req.Header.Set("X-Proxy-Client", tc.clientID)
			}
			resp := do(t, req)
			body := readAll(t, resp.Body)
			if resp.StatusCode != tc.wantStatus || resp.Header.Get("X-Wsp-Error") != tc.wantCode {
				t.Fatalf("got %d %q, want %d %q; body %q", resp.StatusCode, resp.Header.Get("X-Wsp-Error"), tc.wantStatus, tc.wantCode, body)
			}
			if !strings.Contains(body, tc.wantInBody) || strings.Count(body, "\n") != 1 || !strings.HasSuffix(body, "\n") {
				t.Fatalf("body %q: want one line mentioning %q", body, tc.wantInBody)
			}
			if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
				t.Fatalf("content type %q", ct)
			}
			if tc.wantStatus == 503 && resp.Header.Get("Retry-After") == "" {
				t.Fatal("503 without Retry-After")
			}
		})
	}
	close(release)
}

func TestNoClientConnected(t *testing.T) {
	cfg := serverConfig()
	cfg.Timeout = config.Duration(100 * time.Millisecond)
	r := startServer(t, cfg, nil)
	resp := do(t, r.request(t, "GET", "http://127.0.0.1:1/", nil))
	if body := readAll(t, resp.Body); resp.StatusCode != 503 || resp.Header.Get("X-Wsp-Error") != "no_client" {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
}

// TestWaitsForAClient checks that a request arriving before any client
// waits up to timeout for one instead of failing at once.
func TestWaitsForAClient(t *testing.T) {
	cfg := serverConfig()
	cfg.Timeout = config.Duration(10 * time.Second)
	r := startServer(t, cfg, nil)
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "late but fine") }))
	got := make(chan string, 1)
	go func() {
		resp, err := testHTTP.Do(r.request(t, "GET", b.URL, nil))
		if err != nil {
			got <- err.Error()
			return
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		got <- string(body)
	}()
	waitFor(t, "the request to wait", func() bool { return r.waiting() == 1 })
	startClient(t, clientConfig(r, "late"))
	if s := <-got; s != "late but fine" {
		t.Fatalf("got %q", s)
	}
}

func TestSecretKey(t *testing.T) {
	cfg := serverConfig()
	cfg.SecretKey = "s3cret"
	r := startServer(t, cfg, nil)
	for _, tc := range []struct {
		key  string
		want int
	}{{"", 401}, {"wrong", 403}} {
		req, _ := http.NewRequest("GET", r.url+"/register", nil)
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Upgrade", "websocket")
		req.Header.Set("Sec-WebSocket-Version", "13")
		req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
		req.Header.Set("Sec-WebSocket-Protocol", "wsp.v2")
		req.Header.Set("X-Wsp-Client-Id", "c1")
		if tc.key != "" {
			req.Header.Set("X-Secret-Key", tc.key)
		}
		resp := do(t, req)
		if body := readAll(t, resp.Body); resp.StatusCode != tc.want || strings.Contains(body, "s3cret") {
			t.Fatalf("key %q: got %d %q, want %d", tc.key, resp.StatusCode, body, tc.want)
		}
	}
	ccfg := clientConfig(r, "c1")
	ccfg.SecretKey = "s3cret"
	startClient(t, ccfg) // connects: the right key is accepted
}

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}
