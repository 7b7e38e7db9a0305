package test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"

	"wsp/internal/client"
	"wsp/internal/config"
	"wsp/internal/faultproxy"
	"wsp/internal/httperr"
	"wsp/internal/server"
)

// Helpers of the fault tests (fault_test.go) and the soak (soak_test.go).

// leakCheck records the goroutines and open file descriptors now and, when
// the test ends, after every cleanup registered later (servers, clients,
// backends, processes), waits for both to come back to that level.
func leakCheck(t *testing.T) {
	t.Helper()
	// The network poller's descriptors are created on first use and kept:
	// make sure they are counted in the baseline.
	if ln, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
		ln.Close()
	}
	g0, f0 := runtime.NumGoroutine(), openFDs()
	t.Cleanup(func() {
		deadline := time.Now().Add(15 * time.Second)
		for {
			// A GC lets finalizers close what pools dropped: io.Copy
			// between TCP connections splices through pooled pipes.
			runtime.GC()
			g, f := runtime.NumGoroutine(), openFDs()
			if g <= g0 && f <= f0 {
				t.Logf("no leak: goroutines %d (baseline %d), fds %d (baseline %d)", g, g0, f, f0)
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				n := runtime.Stack(buf, true)
				t.Errorf("leak after the test: goroutines %d (baseline %d), fds %d (baseline %d)\n%s\n%s", g, g0, f, f0, fdList(), buf[:n])
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// openFDs counts this process's open file descriptors (Linux; -1 elsewhere).
func openFDs() int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(entries)
}

func fdList() string {
	entries, _ := os.ReadDir("/proc/self/fd")
	var b strings.Builder
	for _, e := range entries {
		target, _ := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		fmt.Fprintf(&b, "fd %s -> %s\n", e.Name(), target)
	}
	return b.String()
}

// quietLogger logs warnings and errors only, through t: the tests that send
// thousands of requests would otherwise log an access line for each.
func quietLogger(t testing.TB, component string) *slog.Logger {
	return slog.New(slog.NewTextHandler(&tWriter{t: t}, &slog.HandlerOptions{Level: slog.LevelWarn})).With("component", component)
}

// startServerWith is startServer with a logger of the caller's choice.
func startServerWith(t testing.TB, cfg config.Server, ln net.Listener, log *slog.Logger) *relay {
	t.Helper()
	if ln == nil {
		var err error
		ln, err = net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
	}
	srv, err := server.New(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &relay{t: t, srv: srv, addr: ln.Addr().String(), url: "http://" + ln.Addr().String(), cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() { r.stop() })
	return r
}

// startClientWith is startClient with a logger of the caller's choice.
func startClientWith(t testing.TB, cfg config.Client, log *slog.Logger) *agent {
	t.Helper()
	c, err := client.New(cfg, log)
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

// newFaultProxy runs a fault proxy to target until the test ends.
func newFaultProxy(t testing.TB, target string) *faultproxy.Proxy {
	t.Helper()
	fp, err := faultproxy.New(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fp.Close() })
	return fp
}

// viaProxy points a client config at the fault proxy instead of the server.
func viaProxy(cfg config.Client, fp *faultproxy.Proxy) config.Client {
	cfg.Targets = []string{"ws://" + fp.Addr() + "/register"}
	return cfg
}

// sessionIDs lists the ids of r's sessions.
func (r *relay) sessionIDs() []string {
	var ids []string
	for _, s := range r.srv.Stats().Sessions {
		ids = append(ids, s.Session)
	}
	return ids
}

func (r *relay) hasSession(id string) bool { return slices.Contains(r.sessionIDs(), id) }

// session returns the stats of session id, if connected.
func (r *relay) session(id string) (server.SessionInfo, bool) {
	for _, s := range r.srv.Stats().Sessions {
		if s.Session == id {
			return s, true
		}
	}
	return server.SessionInfo{}, false
}

// pollUntil polls cond every few milliseconds until it holds or limit
// passes, and returns how long it took and whether it held.
func pollUntil(limit time.Duration, cond func() bool) (time.Duration, bool) {
	start := time.Now()
	for !cond() {
		if time.Since(start) > limit {
			return time.Since(start), false
		}
		time.Sleep(2 * time.Millisecond)
	}
	return time.Since(start), true
}

// loadClient is an HTTP client for tests sending many requests: it keeps
// connections alive (a fresh connection per request would run the loopback
// out of ports) and closes them when the test ends.
func loadClient(t testing.TB, conns int, proxy *url.URL) *http.Client {
	tr := &http.Transport{MaxIdleConnsPerHost: conns, DisableCompression: true}
	if proxy != nil {
		tr.Proxy = http.ProxyURL(proxy)
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

// errorCause names what went wrong with a request for the reports: the
// X-Wsp-Error code (or status) of a failed answer, or the class of a Go
// error.
func errorCause(resp *http.Response, err error) string {
	if err == nil && resp != nil {
		code := resp.Header.Get(httperr.Header)
		if code == "" {
			code = "-"
		}
		return fmt.Sprintf("%d %s", resp.StatusCode, code)
	}
	return errClass(err)
}

var digits = regexp.MustCompile(`[0-9]+`)

// errClass is a short, stable name for err's cause.
func errClass(err error) string {
	var ne net.Error
	switch {
	case err == nil:
		return "none"
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, syscall.ECONNRESET):
		return "connection reset"
	case errors.Is(err, syscall.EPIPE):
		return "broken pipe"
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "unexpected EOF"
	case errors.Is(err, io.EOF):
		return "EOF"
	case websocket.CloseStatus(err) != -1:
		return fmt.Sprintf("websocket close %d", websocket.CloseStatus(err))
	}
	msg := digits.ReplaceAllString(err.Error(), "N")
	if len(msg) > 70 {
		msg = msg[:70] + "…"
	}
	return msg
}

// wspProcess is the wsp binary running one command, its log kept for the
// test's report.
type wspProcess struct {
	cmd    *exec.Cmd
	addr   chan string   // the address of a "listening" log line
	exited chan struct{} // closed once the process is reaped
	err    error         // Wait's result, once exited

	mu  sync.Mutex
	log []string // guarded by mu
}

var listenAddr = regexp.MustCompile(`msg=listening addr=(\S+)`)

// startWsp runs `wsp <command> -config <yaml>` until the test ends (then
// it is killed if still running), and logs its stderr if the test failed.
func startWsp(t *testing.T, command, yaml string) *wspProcess {
	t.Helper()
	cfg := filepath.Join(t.TempDir(), command+".yaml")
	if err := os.WriteFile(cfg, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(wspBinary(t), command, "-config", cfg)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &wspProcess{cmd: cmd, addr: make(chan string, 1), exited: make(chan struct{})}
	go func() {
		defer close(p.exited)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			p.log = append(p.log, line)
			p.mu.Unlock()
			if m := listenAddr.FindStringSubmatch(line); m != nil {
				select {
				case p.addr <- m[1]:
				default:
				}
			}
		}
		io.Copy(io.Discard, stderr)
		p.err = cmd.Wait()
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			p.mu.Lock()
			t.Logf("wsp %s log:\n%s", command, strings.Join(p.log, "\n"))
			p.mu.Unlock()
		}
	})
	return p
}

// listening waits for the process to log the address it listens on.
func (p *wspProcess) listening(t *testing.T) string {
	t.Helper()
	select {
	case a := <-p.addr:
		return a
	case <-p.exited:
		t.Fatalf("wsp exited before listening: %v", p.err)
	case <-time.After(10 * time.Second):
		t.Fatal("wsp did not log its listening address")
	}
	return ""
}

// logged waits up to 10 s for a log line matching re and returns its first
// submatch.
func (p *wspProcess) logged(t *testing.T, re *regexp.Regexp) string {
	t.Helper()
	var found string
	waitFor(t, "a log line matching "+re.String(), func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, line := range p.log {
			if m := re.FindStringSubmatch(line); m != nil {
				found = m[1]
				return true
			}
		}
		return false
	})
	return found
}

// wait waits up to limit for the process to exit and returns its exit code
// (-1 if it did not exit in time).
func (p *wspProcess) wait(limit time.Duration) int {
	select {
	case <-p.exited:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(limit):
		return -1
	}
}

func (p *wspProcess) running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// percentile returns the p-th percentile (0 < p <= 100) of ds, which it
// sorts.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	i := int(float64(len(ds))*p/100+0.5) - 1
	return ds[max(0, min(i, len(ds)-1))]
}
