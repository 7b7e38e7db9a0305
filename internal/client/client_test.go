package client

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
)

func TestBackoff(t *testing.T) {
	ceiling := func(n int) time.Duration {
		if n >= 20 {
			return backoffCap
		}
		return min(backoffCap, backoffBase<<n)
	}
	var prevMax time.Duration
	for _, n := range []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 16, 19, 20, 21, 63, 64, 1000} {
		var most time.Duration
		for range 200 {
			d := backoff(n)
			if d <= 0 || d > backoffCap+time.Millisecond {
				t.Fatalf("backoff(%d) = %v, want in (0, %v]", n, d, backoffCap+time.Millisecond)
			}
			if d > ceiling(n)+time.Millisecond {
				t.Fatalf("backoff(%d) = %v, above its ceiling %v", n, d, ceiling(n))
			}
			most = max(most, d)
		}
		// Full jitter: 200 draws all in the lower half has odds of 2^-200.
		if most <= ceiling(n)/2 {
			t.Errorf("backoff(%d): largest of 200 is %v, want above %v", n, most, ceiling(n)/2)
		}
		if most < prevMax/2 {
			t.Errorf("backoff(%d): largest %v, far below the previous %v: the ceiling shrank", n, most, prevMax)
		}
		prevMax = max(prevMax, most)
	}
	if prevMax < backoffCap/2 {
		t.Errorf("largest back-off %v never neared the cap %v", prevMax, backoffCap)
	}
}

func TestSleep(t *testing.T) {
	if !sleep(context.Background(), time.Millisecond) {
		t.Error("sleep returned false without a cancel")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	start := time.Now()
	if sleep(ctx, time.Hour) {
		t.Error("sleep returned true after a cancel")
	}
	if time.Since(start) > time.Second {
		t.Error("sleep ignored its context")
	}
}

func TestWSURL(t *testing.T) {
	for in, want := range map[string]string{
		"http://server:8080/register":     "ws://server:8080/register",
		"https://server/register":         "wss://server/register",
		"ws://server:8080/register":       "ws://server:8080/register",
		"wss://server/register":           "wss://server/register",
		"https://[::1]:8443/register?x=1": "wss://[::1]:8443/register?x=1",
		"http://http.example/https://x":   "ws://http.example/https://x",
		"wss://https.example/http://x":    "wss://https.example/http://x",
	} {
		if got := wsURL(in); got != want {
			t.Errorf("wsURL(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestHostPort(t *testing.T) {
	for in, want := range map[string]string{
		"http://api.internal/x":       "api.internal:80",
		"https://api.internal/x":      "api.internal:443",
		"http://api.internal:8080/":   "api.internal:8080",
		"https://api.internal:80/":    "api.internal:80",
		"http://10.0.0.1":             "10.0.0.1:80",
		"http://[::1]/":               "[::1]:80",
		"https://[2001:db8::1]/":      "[2001:db8::1]:443",
		"http://[fe80::1%25eth0]:81/": "[fe80::1%eth0]:81",
		"http://api.internal:/":       "api.internal:80",
	} {
		u, err := url.Parse(in)
		if err != nil {
			t.Fatal(err)
		}
		if got := hostPort(u); got != want {
			t.Errorf("hostPort(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestRefusal(t *testing.T) {
	resp := &http.Response{Status: "403 Forbidden", StatusCode: 403, Body: io.NopCloser(strings.NewReader("  invalid X-Secret-Key\n" + strings.Repeat("x", 2000)))}
	err := refusal(resp)
	if !strings.Contains(err.Error(), "403 Forbidden: invalid X-Secret-Key") {
		t.Errorf("refusal = %q", err)
	}
	if len(err.Error()) > 700 {
		t.Errorf("refusal message is %d bytes: the body must be bounded", len(err.Error()))
	}
	if err := refusal(&http.Response{Status: "401 Unauthorized"}); !strings.Contains(err.Error(), "401") {
		t.Errorf("refusal without a body = %q", err)
	}
}

// The pool keeps a connection that served a request cleanly and hands it
// out again, over a real loopback listener.
func TestBackendPoolReuse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 4)
	go func() {
		defer close(accepted)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	defer func() {
		ln.Close()
		for c := range accepted {
			c.Close()
		}
	}()

	p := newBackendPool(time.Second, func() int { return 1 })
	defer p.close()
	u, _ := url.Parse("http://" + ln.Addr().String() + "/x")
	a, reused, err := p.get(context.Background(), u)
	if err != nil || reused {
		t.Fatalf("first get: reused %v, %v", reused, err)
	}
	p.put(a)
	b, reused, err := p.get(context.Background(), u)
	if err != nil || !reused || b != a {
		t.Fatalf("second get: %p reused %v, %v; want %p reused", b, reused, err, a)
	}
	c, reused, err := p.get(context.Background(), u)
	if err != nil || reused || c == a {
		t.Fatalf("third get while the first is out: reused %v, %v", reused, err)
	}
	p.put(b)
	p.put(c) // beyond maxIdle: closed
	if !closed(c) {
		t.Error("a connection beyond maxIdle was kept open")
	}
	if closed(b) {
		t.Error("an idle connection within maxIdle was closed")
	}
	p.close()
	if !closed(b) {
		t.Error("close left an idle connection open")
	}
	d, reused, err := p.get(context.Background(), u)
	if err != nil || reused {
		t.Fatalf("get after close: reused %v, %v", reused, err)
	}
	p.put(d) // after close: closed, not kept
	if !closed(d) {
		t.Error("put after close kept the connection")
	}
}

// closed reports whether this side of bc was closed.
func closed(bc *backendConn) bool {
	bc.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
	_, err := bc.Read(make([]byte, 1))
	return errors.Is(err, net.ErrClosed)
}

// The idle bound per destination follows the sessions up: each carries up
// to poolmaxsize requests, and a target may hold several.
func TestBackendPoolBoundFollowsSessions(t *testing.T) {
	c := newTestClient(t)
	per := c.cfg.PoolMaxSize
	if got := c.backends.maxIdle(); got != per*len(c.cfg.Targets) {
		t.Fatalf("bound %d with no session up, want %d", got, per*len(c.cfg.Targets))
	}
	c.ready.Add(5)
	defer c.ready.Add(-5)
	if got := c.backends.maxIdle(); got != 5*per {
		t.Fatalf("bound %d with 5 sessions up, want %d", got, 5*per)
	}
}
