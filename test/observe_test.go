package test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"wsp/internal/client"
	"wsp/internal/config"
	"wsp/internal/server"
)

func getBody(t *testing.T, url string, header ...string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp := do(t, req)
	return resp.StatusCode, readAll(t, resp.Body)
}

func TestMetricsStatsAndHealth(t *testing.T) {
	r, b := setup(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.URL.Path == "/missing" {
			http.NotFound(w, req)
			return
		}
		io.WriteString(w, "hello")
	}))
	adm := httptest.NewServer(r.srv.AdminHandler())
	t.Cleanup(adm.Close)
	for range 3 {
		readAll(t, do(t, r.request(t, "GET", b.URL+"/ok", nil)).Body)
	}
	readAll(t, do(t, r.request(t, "GET", b.URL+"/missing", nil)).Body)
	readAll(t, do(t, r.request(t, "GET", "http://127.0.0.1:1/", nil)).Body) // 502: dial fails

	status, body := getBody(t, adm.URL+"/metrics")
	if status != 200 {
		t.Fatalf("/metrics: %d", status)
	}
	for _, want := range []string{
		`wsp_requests_total{client="c1",code="2xx",entry="request"} 3`,
		`wsp_requests_total{client="c1",code="4xx",entry="request"} 1`,
		`wsp_requests_total{client="c1",code="5xx",entry="request"} 1`,
		`wsp_sessions{client="c1"} 1`,
		`wsp_requests_in_flight{entry="request"} 0`,
		`wsp_bytes_total{direction="out"}`,
		`wsp_request_duration_seconds_count{entry="request"} 5`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if strings.Contains(body, b.URL) || strings.Contains(body, "/missing") {
		t.Error("/metrics carries destination URLs")
	}

	var st server.Stats
	_, body = getBody(t, adm.URL+"/api/stats")
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatal(err)
	}
	if st.Requests != 5 || st.Errors != 1 || st.Clients != 1 || len(st.RecentErrors) != 1 || st.RecentErrors[0].Code != "dial_failed" {
		t.Fatalf("/api/stats: %s", body)
	}
	var clients struct{ Clients []server.ClientInfo }
	_, body = getBody(t, adm.URL+"/api/clients")
	json.Unmarshal([]byte(body), &clients)
	if len(clients.Clients) != 1 || clients.Clients[0].ID != "c1" || clients.Clients[0].Sessions[0].Requests != 5 || clients.Clients[0].Sessions[0].LastError == nil {
		t.Fatalf("/api/clients: %s", body)
	}
	for _, path := range []string{"/healthz", "/readyz", "/status", "/debug/pprof/"} {
		if status, _ := getBody(t, adm.URL+path); status != 200 {
			t.Errorf("%s: %d", path, status)
		}
	}
	if status, body := getBody(t, adm.URL+"/"); status != 200 || !strings.Contains(body, "<html") {
		t.Errorf("dashboard: %d", status)
	}
	// pprof is on the admin listener only.
	if status, _ := getBody(t, r.url+"/debug/pprof/"); status == 200 {
		t.Error("pprof served on the public port")
	}
}

func TestAdminAuth(t *testing.T) {
	cfg := serverConfig()
	cfg.Auth = config.Auth{Tokens: []string{"ops-token"}}
	cfg.AdminAuth = true
	r := startServer(t, cfg, nil)
	adm := httptest.NewServer(r.srv.AdminHandler())
	t.Cleanup(adm.Close)
	if status, _ := getBody(t, adm.URL+"/metrics"); status != 401 {
		t.Fatalf("without credentials: %d", status)
	}
	if status, _ := getBody(t, adm.URL+"/api/stats", "Authorization", "Bearer ops-token"); status != 200 {
		t.Fatalf("with credentials: %d", status)
	}
}

func TestRequestIDAndAccessLog(t *testing.T) {
	var logs bytes.Buffer
	seen := make(chan string, 2)
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		seen <- req.Header.Get("X-Request-Id")
		w.Header().Set("X-Request-Id", "backend-made-this-up")
	}))
	cfg := serverConfig()
	cfg.LogFormat = "json"
	srv, err := server.New(cfg, slog.New(slog.NewJSONHandler(&lockedWriter{w: &logs}, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	r := &relay{t: t, srv: srv, addr: ln.Addr().String(), url: "http://" + ln.Addr().String(), cancel: cancel, done: done}
	t.Cleanup(func() { r.stop() })
	startClient(t, clientConfig(r, "c1"))

	req := r.request(t, "POST", b.URL+"/path?secret=1", strings.NewReader("12345"))
	req.Header.Set("X-Request-Id", "app-id-42")
	resp := do(t, req)
	readAll(t, resp.Body)
	if got := <-seen; got != "app-id-42" {
		t.Fatalf("destination got request id %q", got)
	}
	if got := resp.Header.Values("X-Request-Id"); len(got) != 1 || got[0] != "app-id-42" {
		t.Fatalf("app got request id %q", got)
	}
	resp = do(t, r.request(t, "GET", b.URL, nil))
	readAll(t, resp.Body)
	generated := resp.Header.Get("X-Request-Id")
	if got := <-seen; got == "" || got != generated {
		t.Fatalf("generated id: destination %q, app %q", got, generated)
	}
	r.stop()

	var line map[string]any
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, `"app-id-42"`) {
			json.Unmarshal([]byte(l), &line)
		}
	}
	want := map[string]any{"msg": "request", "id": "app-id-42", "entry": "request", "client": "c1", "method": "POST",
		"host": strings.TrimPrefix(b.URL, "http://"), "status": float64(200), "bytes_in": float64(5)}
	for k, v := range want {
		if line[k] != v {
			t.Errorf("access log %s = %v, want %v (line %v)", k, line[k], v, line)
		}
	}
	for _, k := range []string{"time", "session", "bytes_out", "duration"} {
		if _, ok := line[k]; !ok {
			t.Errorf("access log lacks %s: %v", k, line)
		}
	}
	if strings.Contains(logs.String(), "secret=1") {
		t.Error("the access log carries a query string")
	}
}

func TestClientAdmin(t *testing.T) {
	r := startServer(t, serverConfig(), nil)
	cfg := clientConfig(r, "c1")
	c, err := client.New(cfg, testLogger(t, "client"))
	if err != nil {
		t.Fatal(err)
	}
	adm := httptest.NewServer(c.AdminHandler())
	t.Cleanup(adm.Close)
	if status, _ := getBody(t, adm.URL+"/readyz"); status != 503 {
		t.Fatalf("readyz before connecting: %d", status)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); c.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitFor(t, "connected", c.Ready)
	if status, _ := getBody(t, adm.URL+"/readyz"); status != 200 {
		t.Fatalf("readyz when connected: %d", status)
	}
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
	readAll(t, do(t, r.request(t, "GET", b.URL, nil)).Body)
	_, body := getBody(t, adm.URL+"/metrics")
	for _, want := range []string{`wsp_client_sessions 1`, `wsp_client_requests_total{code="2xx",kind="http"} 1`} {
		if !strings.Contains(body, want) {
			t.Errorf("client /metrics lacks %s", want)
		}
	}
	_, body = getBody(t, adm.URL+"/api/stats")
	if !strings.Contains(body, `"connected":true`) || !strings.Contains(body, `"id":"c1"`) {
		t.Errorf("client /api/stats: %s", body)
	}
}

// TestAPIFollowsClients: /api/clients lists clients as they come and go.
func TestAPIFollowsClients(t *testing.T) {
	r := startServer(t, serverConfig(), nil)
	adm := httptest.NewServer(r.srv.AdminHandler())
	t.Cleanup(adm.Close)
	ids := func() []string {
		var v struct{ Clients []server.ClientInfo }
		_, body := getBody(t, adm.URL+"/api/clients")
		if err := json.Unmarshal([]byte(body), &v); err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, c := range v.Clients {
			out = append(out, fmt.Sprintf("%s:%d", c.ID, len(c.Sessions)))
		}
		return out
	}
	if got := ids(); len(got) != 0 {
		t.Fatalf("before any client: %v", got)
	}
	a := startClient(t, clientConfig(r, "alpha"))
	b := startClient(t, clientConfig(r, "beta"))
	startClient(t, clientConfig(r, "beta"))
	waitFor(t, "three sessions", func() bool { return r.sessions() == 3 })
	if got := strings.Join(ids(), " "); got != "alpha:1 beta:2" {
		t.Fatalf("with alpha and two betas: %q", got)
	}
	a.stop()
	b.stop()
	waitFor(t, "two gone", func() bool { return r.sessions() == 1 })
	if got := strings.Join(ids(), " "); got != "beta:1" {
		t.Fatalf("after alpha and one beta left: %q", got)
	}
	_, body := getBody(t, adm.URL+"/metrics")
	if strings.Contains(body, `wsp_sessions{client="alpha"}`) || !strings.Contains(body, `wsp_sessions{client="beta"} 1`) {
		t.Fatalf("wsp_sessions does not follow: %s", grepLines(body, "wsp_sessions"))
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
