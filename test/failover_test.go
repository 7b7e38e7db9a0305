package test

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// startClientProcess runs `wsp client` as a process with the given id,
// connected to r, until the test ends.
func startClientProcess(t *testing.T, r *relay, id string) *exec.Cmd {
	t.Helper()
	cfg := filepath.Join(t.TempDir(), id+".yaml")
	body := fmt.Sprintf("id: %s\ntargets: [ws://%s/register]\nallowany: true\nkeepalive: 1s\n", id, r.addr)
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(wspBinary(t), "client", "-config", cfg)
	cmd.Stderr = io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd
}

// TestFailoverWhenAClientProcessIsKilled: two client processes share an id;
// one is killed with SIGKILL in the middle of a stream of requests. Once the
// server has dropped it, every request succeeds through the other, and no
// in-flight count leaks.
func TestFailoverWhenAClientProcessIsKilled(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	r := startServer(t, serverConfig(), nil)
	var hits atomic.Int64
	b := backend(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		hits.Add(1)
		io.WriteString(w, "ok")
	}))
	victim := startClientProcess(t, r, "pool")
	startClientProcess(t, r, "pool")
	waitFor(t, "both client processes", func() bool { return r.sessions() == 2 })

	get := func() (int, error) {
		req := r.request(t, "GET", b.URL, nil)
		req.Header.Set("X-Proxy-Client", "pool")
		resp, err := testHTTP.Do(req)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, nil
	}
	for i := range 50 {
		if status, err := get(); status != 200 {
			t.Fatalf("before the kill, request %d: %d %v", i, status, err)
		}
	}
	victim.Process.Signal(os.Kill)
	// Requests racing the kill may fail; the pool must heal promptly.
	deadline := time.Now().Add(10 * time.Second)
	for r.sessions() != 1 {
		if time.Now().After(deadline) {
			t.Fatal("the killed client's session was never dropped")
		}
		get()
	}
	for i := range 200 {
		if status, err := get(); status != 200 {
			t.Fatalf("after the kill, request %d: %d %v", i, status, err)
		}
	}
	waitFor(t, "in-flight counts back to zero", func() bool { return r.inflight() == 0 })
	for _, s := range r.srv.Stats().Sessions {
		if s.InFlight < 0 {
			t.Fatalf("negative in-flight count: %+v", s)
		}
	}
}
