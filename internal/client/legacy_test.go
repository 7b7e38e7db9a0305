package client

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"wsp/internal/config"
	"wsp/internal/httperr"
	"wsp/internal/legacy"
	"wsp/internal/rules"
)

func TestLegacyDials(t *testing.T) {
	for _, c := range []struct {
		name                                   string
		idleSize, maxSize, open, busy, dialing int
		want                                   int
	}{
		{"empty pool: one probe", 10, 100, 0, 0, 0, 1},
		{"empty pool, probe on its way", 10, 100, 0, 0, 1, 0},
		{"empty pool, no idle wanted: still one", 0, 100, 0, 0, 0, 1},
		{"first up: fill", 10, 100, 1, 0, 0, 9},
		{"dialing counts as idle", 10, 100, 1, 0, 4, 5},
		{"full of idle", 10, 100, 10, 0, 0, 0},
		{"more idle than wanted: never closes", 10, 100, 12, 0, 0, 0},
		{"a request started: replace it", 10, 100, 10, 1, 0, 1},
		{"busy ones do not count as idle", 10, 100, 15, 10, 0, 5},
		{"capped by max", 10, 12, 10, 8, 0, 2},
		{"at max", 10, 12, 12, 12, 0, 0},
		{"at max with dials", 10, 12, 10, 10, 2, 0},
		{"idle size above max", 20, 5, 1, 0, 0, 4},
		{"no idle wanted, one up busy", 0, 5, 1, 1, 0, 0},
	} {
		if got := legacyDials(c.idleSize, c.maxSize, c.open, c.busy, c.dialing); got != c.want {
			t.Errorf("%s: legacyDials(%d, %d, %d, %d, %d) = %d, want %d", c.name, c.idleSize, c.maxSize, c.open, c.busy, c.dialing, got, c.want)
		}
	}
}

// legacyTestPool is a pool whose requests can be run without a server.
func legacyTestPool(t *testing.T, edit func(*config.Client)) *legacyPool {
	t.Helper()
	cfg := config.DefaultClient()
	cfg.ID = "legacy-unit"
	cfg.AllowAny = true
	cfg.Legacy = true
	if edit != nil {
		edit(&cfg)
	}
	c, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	p := newLegacyPool(c, "ws://127.0.0.1:1/register")
	p.abandon = context.Background()
	t.Cleanup(p.http.CloseIdleConnections)
	return p
}

func TestLegacyRoundTrip(t *testing.T) {
	var mu sync.Mutex
	var seen http.Header
	b := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = r.Header.Clone()
		mu.Unlock()
		w.Header().Set("Connection", "X-Answer-Hop")
		w.Header().Set("X-Answer-Hop", "1")
		w.Header().Set("Keep-Alive", "timeout=5")
		w.Header().Set("X-Kept", "yes")
		w.Write([]byte("hello"))
	}))
	defer b.Close()
	p := legacyTestPool(t, nil)
	head := legacy.RequestHead{Method: "GET", URL: b.URL + "/x?y=1", ContentLength: -1, Header: http.Header{
		"Connection":          {"Upgrade, X-Hop"},
		"Upgrade":             {"websocket"},
		"X-Hop":               {"1"},
		"X-Proxy-Destination": {b.URL + "/x?y=1"},
		"Accept":              {"*/*"},
	}}
	ans, body, e := p.roundTrip(head, nil)
	if e != nil {
		t.Fatal(e)
	}
	if ans.StatusCode != 200 || string(body) != "hello" || ans.ContentLength != 5 {
		t.Errorf("answer %+v %q", ans, body)
	}
	for _, h := range []string{"Connection", "X-Answer-Hop", "Keep-Alive"} {
		if _, ok := ans.Header[h]; ok {
			t.Errorf("answer kept hop-by-hop header %s", h)
		}
	}
	if ans.Header.Get("X-Kept") != "yes" {
		t.Errorf("answer lost X-Kept: %v", ans.Header)
	}
	mu.Lock()
	got := seen
	mu.Unlock()
	for _, h := range []string{"Upgrade", "X-Hop", "X-Proxy-Destination"} {
		if _, ok := got[h]; ok {
			t.Errorf("destination got %s", h)
		}
	}
	if got.Get("Accept") != "*/*" {
		t.Errorf("destination lost Accept: %v", got)
	}

	// HEAD: no body, the length a GET would bring.
	ans, body, e = p.roundTrip(legacy.RequestHead{Method: "HEAD", URL: b.URL + "/"}, nil)
	if e != nil || len(body) != 0 || ans.ContentLength != 5 {
		t.Errorf("HEAD: %+v %q %v", ans, body, e)
	}
}

func TestLegacyRoundTripErrors(t *testing.T) {
	b := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/nohead":
			<-r.Context().Done()
		case "/stall":
			w.Write([]byte("a bit"))
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		case "/big":
			w.Write(make([]byte, 2048))
		case "/switch":
			conn, bw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				return
			}
			bw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: rogue\r\n\r\n")
			bw.Flush()
			conn.Close()
		}
	}))
	defer b.Close()
	p := legacyTestPool(t, func(c *config.Client) {
		c.HeaderTimeout = config.Duration(300 * time.Millisecond)
		c.MaxMessageBytes = 1024
	})
	for _, c := range []struct {
		method, url string
		status      int
		code, msg   string
	}{
		{"CONNECT", "http://" + b.Listener.Addr().String(), 400, httperr.BadRequest, "CONNECT"},
		{"BAD METHOD", b.URL, 400, httperr.BadDestination, "unusable request"},
		{"GET", "/relative", 400, httperr.BadDestination, `"/relative"`},
		{"GET", "ftp://host/x", 400, httperr.BadDestination, "ftp://host/x"},
		{"GET", b.URL + "/nohead", 504, httperr.DestinationTimeout, "did not answer in time"},
		{"GET", b.URL + "/stall", 504, httperr.DestinationTimeout, "did not answer in time"},
		{"GET", b.URL + "/big", 502, httperr.DestinationBroken, "exceeds maxmessagebytes"},
		{"GET", b.URL + "/switch", 502, httperr.DestinationBroken, "switched protocols"},
	} {
		_, body, e := p.roundTrip(legacy.RequestHead{Method: c.method, URL: c.url}, nil)
		if e == nil {
			t.Errorf("%s %s: answered %q, want %d %s", c.method, c.url, body, c.status, c.code)
			continue
		}
		if e.Status != c.status || e.Code != c.code || !strings.Contains(e.Msg, c.msg) {
			t.Errorf("%s %s: %d %s %q, want %d %s with %q", c.method, c.url, e.Status, e.Code, e.Msg, c.status, c.code, c.msg)
		}
	}
}

func TestLegacyRefusedByRules(t *testing.T) {
	p := legacyTestPool(t, func(c *config.Client) {
		c.AllowAny = false
		c.Whitelist = []rules.Spec{{URL: "^http://allowed\\.test/"}}
	})
	ans, body, e := p.roundTrip(legacy.RequestHead{Method: "GET", URL: "http://127.0.0.1:1/secret"}, nil)
	if e == nil || e.Status != http.StatusForbidden || e.Code != httperr.ClientRefused {
		t.Fatalf("got %+v %q %v, want 403 client_refused", ans, body, e)
	}
}

func TestLegacyErrorAnswer(t *testing.T) {
	ans, body := errorAnswer(httperr.New(http.StatusForbidden, httperr.ClientRefused, "refused by the rules of client %q", "c1"))
	if ans.StatusCode != 403 || ans.Header.Get(httperr.Header) != httperr.ClientRefused ||
		!strings.HasPrefix(ans.Header.Get("Content-Type"), "text/plain") || string(body) != "refused by the rules of client \"c1\"\n" || ans.ContentLength != int64(len(body)) {
		t.Errorf("403: %+v %q", ans, body)
	}
	ans, body = errorAnswer(httperr.Wrap(context.DeadlineExceeded, http.StatusServiceUnavailable, httperr.ClientBusy, "busy"))
	if ans.StatusCode != 503 || ans.Header.Get("Retry-After") == "" || !bytes.Contains(body, []byte("deadline exceeded")) || bytes.Count(body, []byte("\n")) != 1 {
		t.Errorf("503: %+v %q", ans, body)
	}
}

func TestLegacyIDWithUnderscore(t *testing.T) {
	cfg := config.DefaultClient()
	cfg.ID = "has_underscore"
	cfg.AllowAny = true
	cfg.Legacy = true
	if _, err := New(cfg, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "legacy") {
		t.Fatalf("an id with '_' must be refused with legacy: true: %v", err)
	}
	cfg.Legacy = false
	if _, err := New(cfg, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatalf("an id with '_' is fine for wsp.v2: %v", err)
	}
}
