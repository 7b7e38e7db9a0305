package test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"wsp/internal/tunnel"
)

// idleSessions is how many sessions TestIdleSessionCost opens: enough that
// the server's fixed costs vanish in the per-session figure.
const idleSessions = 300

// TestIdleSessionCost holds idleSessions idle client sessions on a real
// server process and measures what each costs it: goroutines, and heap
// plus goroutine stacks after a GC (from the server's own pprof). A server
// holding 10,000 clients lives on these numbers (make bench-clients
// measures the whole process's RSS).
func TestIdleSessionCost(t *testing.T) {
	srv := startWsp(t, "server", "host: 127.0.0.1\nport: 0\nadmin: 127.0.0.1:0\nkeepalive: 30s\n")
	addr := srv.listening(t)
	admin := srv.logged(t, adminAddr)

	g0, m0 := serverCost(t, admin)
	dialer := tunnel.NewDialer(10 * time.Second)
	cfg := tunnel.DefaultConfig()
	cfg.KeepAlive = 30 * time.Second
	sessions := make([]*tunnel.Session, idleSessions)
	var wg sync.WaitGroup
	errs := make(chan error, idleSessions)
	sem := make(chan struct{}, 16)
	for i := range sessions {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			hello := tunnel.Hello{ClientID: fmt.Sprintf("idle%03d", i), MaxStreams: 4, Version: "test"}
			ws, _, err := dialer.DialContext(context.Background(), "ws://"+addr+"/register", hello.Header())
			if err != nil {
				errs <- err
				return
			}
			s, err := tunnel.NewClientSession(ws, cfg)
			if err != nil {
				errs <- err
				return
			}
			sessions[i] = s
		}()
	}
	wg.Wait()
	defer func() {
		for _, s := range sessions {
			if s != nil {
				s.Close()
			}
		}
	}()
	close(errs)
	for err := range errs {
		t.Fatalf("opening a session: %v", err)
	}
	waitFor(t, "the server to count every session", func() bool {
		return sessionsGauge(get(t, admin+"/metrics")) == idleSessions
	})

	g1, m1 := serverCost(t, admin)
	perGoroutines := float64(g1-g0) / idleSessions
	perBytes := float64(m1-m0) / idleSessions
	t.Logf("per idle session: %.2f goroutines, %.1f KiB of heap and stacks (server totals: %d -> %d goroutines, %.1f -> %.1f MiB)",
		perGoroutines, perBytes/1024, g0, g1, float64(m0)/(1<<20), float64(m1)/(1<<20))
	// yamux's receive and send loops, and one spare for noise: a waiting
	// goroutine per session (the registering handler, a keepalive loop)
	// is what this guards against.
	if perGoroutines > 2.2 {
		t.Errorf("%.2f server goroutines per idle session, want at most 2 (yamux's receive and send loops)", perGoroutines)
	}
	if perBytes > 30<<10 {
		t.Errorf("%.1f KiB of server heap and stacks per idle session, want at most 30", perBytes/1024)
	}
}

var (
	adminAddr      = regexp.MustCompile(`msg="admin listening" addr=(\S+)`)
	goroutineTotal = regexp.MustCompile(`goroutine profile: total (\d+)`)
	heapInuse      = regexp.MustCompile(`# HeapInuse = (\d+)`)
	stackInuse     = regexp.MustCompile(`# Stack = (\d+) /`)
	sessionsLine   = regexp.MustCompile(`(?m)^wsp_sessions(?:\{[^}]*\})? (\d+)`)
)

// serverCost reads the server's goroutine count and, after a GC, its heap
// and stack bytes in use.
func serverCost(t *testing.T, admin string) (goroutines int, bytes int64) {
	t.Helper()
	g := goroutineTotal.FindStringSubmatch(get(t, admin+"/debug/pprof/goroutine?debug=1"))
	heap := get(t, admin+"/debug/pprof/heap?gc=1&debug=1")
	h, s := heapInuse.FindStringSubmatch(heap), stackInuse.FindStringSubmatch(heap)
	if g == nil || h == nil || s == nil {
		t.Fatalf("cannot read the server's goroutines, heap or stacks from pprof")
	}
	goroutines, _ = strconv.Atoi(g[1])
	hb, _ := strconv.ParseInt(h[1], 10, 64)
	sb, _ := strconv.ParseInt(s[1], 10, 64)
	return goroutines, hb + sb
}

// sessionsGauge sums the server's sessions gauge over client ids.
func sessionsGauge(metrics string) int {
	n := 0
	for _, m := range sessionsLine.FindAllStringSubmatch(metrics, -1) {
		v, _ := strconv.Atoi(m[1])
		n += v
	}
	return n
}

func get(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET %s: %d %v", url, resp.StatusCode, err)
	}
	return string(b)
}
