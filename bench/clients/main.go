// Command clients measures a wsp server holding many idle client sessions:
// it opens N sessions speaking the real protocol (WebSocket + yamux, one
// process, many ids), reports the server's RSS per session (from /proc),
// how long connecting took, and checks a request reaches a random one.
//
// Usage (see bench/clients.sh): clients -server 127.0.0.1:PORT -pid PID -n 10000
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"wsp/internal/tunnel"
)

func main() {
	server := flag.String("server", "127.0.0.1:8080", "server host:port")
	pid := flag.Int("pid", 0, "server process id, to read its memory")
	n := flag.Int("n", 1000, "sessions to open")
	parallel := flag.Int("parallel", 64, "handshakes at once")
	hold := flag.Duration("hold", 0, "keep the sessions open this long after measuring (to inspect the server)")
	flag.Parse()
	if err := run(*server, *pid, *n, *parallel, *hold); err != nil {
		fmt.Fprintln(os.Stderr, "clients:", err)
		os.Exit(1)
	}
}

func run(server string, pid, n, parallel int, hold time.Duration) error {
	before, err := rssKiB(pid)
	if err != nil {
		return err
	}
	dialer := tunnel.NewDialer(30 * time.Second)
	cfg := tunnel.DefaultConfig()
	cfg.KeepAlive = 30 * time.Second // idle: as few pings as a real fleet
	sessions := make([]*tunnel.Session, n)
	var failed atomic.Int64
	var wg sync.WaitGroup
	sem := make(chan struct{}, parallel)
	start := time.Now()
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			hello := tunnel.Hello{ClientID: fmt.Sprintf("c%05d", i), MaxStreams: 4, Version: "bench"}
			ws, _, err := dialer.DialContext(context.Background(), "ws://"+server+"/register", hello.Header())
			if err != nil {
				failed.Add(1)
				return
			}
			s, err := tunnel.NewClientSession(ws, cfg)
			if err != nil {
				failed.Add(1)
				return
			}
			sessions[i] = s
		}()
	}
	wg.Wait()
	connectTime := time.Since(start)
	if f := failed.Load(); f > 0 {
		return fmt.Errorf("%d of %d sessions failed to connect", f, n)
	}
	// Serve one request on a random session, answering from here.
	pick := rand.IntN(n)
	go func() {
		st, err := sessions[pick].AcceptStream()
		if err != nil {
			return
		}
		br := bufio.NewReader(st)
		if _, err := http.ReadRequest(br); err == nil {
			io.WriteString(st, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\npong")
		}
	}()
	time.Sleep(2 * time.Second) // let the server settle after the burst
	after, err := rssKiB(pid)
	if err != nil {
		return err
	}
	req, _ := http.NewRequest("GET", "http://"+server+"/request", nil)
	req.Header.Set("X-Proxy-Destination", "http://internal.example/ping")
	req.Header.Set("X-Proxy-Client", fmt.Sprintf("c%05d", pick))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fmt.Printf("sessions: %d connected in %v (%.0f/s)\n", n, connectTime.Round(time.Millisecond), float64(n)/connectTime.Seconds())
	fmt.Printf("server RSS: %.1f MiB before, %.1f MiB after: %.1f KiB per idle session\n", float64(before)/1024, float64(after)/1024, float64(after-before)/float64(n))
	fmt.Printf("request to session %d of %d: %d %q\n", pick, n, resp.StatusCode, body)
	time.Sleep(hold)
	for _, s := range sessions {
		s.Close()
	}
	if resp.StatusCode != 200 || string(body) != "pong" {
		return fmt.Errorf("the request did not reach the chosen session")
	}
	return nil
}

// rssKiB reads VmRSS of a process.
func rssKiB(pid int) (int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			return strconv.ParseInt(f[1], 10, 64)
		}
	}
	return 0, fmt.Errorf("no VmRSS for pid %d", pid)
}
