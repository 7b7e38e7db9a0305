package test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"wsp/internal/config"
)

func TestClientReconnectsAfterServerRestart(t *testing.T) {
	r1 := startServer(t, serverConfig(), nil)
	addr := r1.addr
	a := startClient(t, clientConfig(r1, "c1"))
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "up") }))

	if err := r1.stop(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "client to notice", func() bool { return !a.c.Ready() })

	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	r2 := startServer(t, serverConfig(), ln)
	waitFor(t, "client to reconnect", func() bool { return r2.sessions() == 1 })
	resp := do(t, r2.request(t, "GET", b.URL, nil))
	if got := readAll(t, resp.Body); resp.StatusCode != 200 || got != "up" {
		t.Fatalf("after restart: %d %q", resp.StatusCode, got)
	}
}

// TestServerDrainLetsInFlightRequestsFinish stops the server while a
// request is in flight: the request completes, then Serve returns.
func TestServerDrainLetsInFlightRequestsFinish(t *testing.T) {
	started := make(chan struct{})
	finish := make(chan struct{})
	r, b := setup(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		close(started)
		<-finish
		io.WriteString(w, "finished")
	}))
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
	<-started
	stopped := make(chan error, 1)
	go func() { stopped <- r.stop() }()
	// New app connections are refused once the drain has begun.
	waitFor(t, "listener closed", func() bool {
		c, err := net.DialTimeout("tcp", r.addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	select {
	case err := <-stopped:
		t.Fatalf("server stopped (%v) with a request in flight", err)
	default:
	}
	close(finish)
	if s := <-got; s != "finished" {
		t.Fatalf("in-flight request got %q", s)
	}
	if err := <-stopped; err != nil {
		t.Fatalf("Serve: %v", err)
	}
}

// TestClientDrainFinishesInFlightRequests stops the client while it serves
// a request: the request completes and the client's Run returns.
func TestClientDrainFinishesInFlightRequests(t *testing.T) {
	started := make(chan struct{})
	finish := make(chan struct{})
	r := startServer(t, serverConfig(), nil)
	a := startClient(t, clientConfig(r, "c1"))
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		close(started)
		<-finish
		io.WriteString(w, "finished")
	}))
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
	<-started
	a.cancel()
	time.AfterFunc(50*time.Millisecond, func() { close(finish) })
	if s := <-got; s != "finished" {
		t.Fatalf("in-flight request got %q", s)
	}
	select {
	case <-a.done:
	case <-time.After(10 * time.Second):
		t.Fatal("client did not stop after its last request")
	}
}

// TestIdleSessionClosed: a session from which nothing arrives for
// idletimeout (here: a client with keepalives far apart) is dropped.
func TestIdleSessionClosed(t *testing.T) {
	scfg := serverConfig()
	scfg.IdleTimeout = config.Duration(200 * time.Millisecond)
	r := startServer(t, scfg, nil)
	ccfg := clientConfig(r, "quiet")
	ccfg.KeepAlive = config.Duration(time.Hour)
	startClient(t, ccfg)
	waitFor(t, "idle session dropped", func() bool { return r.sessions() == 0 })
}

// TestDemo builds the binary, runs `wsp demo` as the README says, and runs
// the first curl line it prints.
func TestDemo(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("curl is not installed (.ci/run installs it)")
	}
	bin := wspBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	demo := exec.CommandContext(ctx, bin, "demo", "-port", "0")
	stdout, err := demo.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	demo.Stderr = io.Discard
	if err := demo.Start(); err != nil {
		t.Fatal(err)
	}
	var curlLine string
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if line := strings.TrimSpace(sc.Text()); strings.HasPrefix(line, "curl ") {
			curlLine = line
			break
		}
	}
	go io.Copy(io.Discard, stdout)
	if curlLine == "" {
		t.Fatal("demo printed no curl line")
	}
	cmd := exec.CommandContext(ctx, "sh", "-c", strings.Replace(curlLine, "curl ", curl+" -sS --fail ", 1))
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "hello from the internal API") {
		t.Fatalf("%s: %v\n%s", curlLine, err, out)
	}
	demo.Process.Signal(syscall.SIGINT)
	if err := demo.Wait(); err != nil {
		t.Fatalf("demo exit after SIGINT: %v", err)
	}
}

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// wspBinary builds cmd/wsp once per test run.
func wspBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "wsp-test-bin")
		if err != nil {
			buildErr = err
			return
		}
		builtBin = filepath.Join(dir, "wsp")
		out, err := exec.Command("go", "build", "-o", builtBin, "../cmd/wsp").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtBin
}

// TestDrainNotice: once a drain starts, /readyz fails on the app port while
// requests are still served, for drainnotice; then the listener closes.
func TestDrainNotice(t *testing.T) {
	cfg := serverConfig()
	cfg.DrainNotice = config.Duration(2 * time.Second)
	r := startServer(t, cfg, nil)
	startClient(t, clientConfig(r, "c1"))
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "served") }))
	stopped := make(chan error, 1)
	go func() { stopped <- r.stop() }()
	waitFor(t, "/readyz to fail", func() bool {
		status, _ := getBody(t, r.url+"/readyz")
		return status == http.StatusServiceUnavailable
	})
	resp := do(t, r.request(t, "GET", b.URL, nil))
	if got := readAll(t, resp.Body); resp.StatusCode != 200 || got != "served" {
		t.Fatalf("during the drain notice: %d %q", resp.StatusCode, got)
	}
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
}
