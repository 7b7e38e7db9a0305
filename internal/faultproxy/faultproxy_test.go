package faultproxy

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// upstream is an echo server: it sends back what it reads and half-closes
// when its peer does. Every goroutine and connection ends with the test.
type upstream struct {
	ln       net.Listener
	accepted atomic.Int64
	wg       sync.WaitGroup
	mu       sync.Mutex
	conns    []net.Conn
	readErrs chan error // how each connection's reading ended
}

func startUpstream(t *testing.T) *upstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &upstream{ln: ln, readErrs: make(chan error, 100)}
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u.accepted.Add(1)
			u.mu.Lock()
			u.conns = append(u.conns, c)
			u.mu.Unlock()
			u.wg.Add(1)
			go func() {
				defer u.wg.Done()
				_, err := io.Copy(c, c)
				select {
				case u.readErrs <- err:
				default:
				}
				c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		u.mu.Lock()
		for _, c := range u.conns {
			c.Close()
		}
		u.mu.Unlock()
		u.wg.Wait()
	})
	return u
}

func (u *upstream) addr() string { return u.ln.Addr().String() }

func newProxy(t *testing.T, target string) *Proxy {
	t.Helper()
	p, err := New(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func dial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// roundTrip writes msg and reads it back within limit.
func roundTrip(c net.Conn, msg string, limit time.Duration) (string, error) {
	if _, err := io.WriteString(c, msg); err != nil {
		return "", err
	}
	c.SetReadDeadline(time.Now().Add(limit))
	defer c.SetReadDeadline(time.Time{})
	buf := make([]byte, len(msg))
	n, err := io.ReadFull(c, buf)
	return string(buf[:n]), err
}

// waitFor polls cond until it holds, failing the test after 5 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func TestPassCarriesBytesAndHalfClose(t *testing.T) {
	u := startUpstream(t)
	p := newProxy(t, u.addr())
	c := dial(t, p.Addr())

	// 8 MiB each way, written while read, so both directions are busy.
	want := make([]byte, 8<<20)
	rand.Read(want)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(want)
		if err == nil {
			err = c.CloseWrite() // the echo half-closes back
		}
		werr <- err
	}()
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if err := <-werr; err != nil {
		t.Fatalf("write: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("got %d bytes back, want the %d sent", len(got), len(want))
	}
	waitFor(t, "link torn down after both half-closes", func() bool { return p.Conns() == 0 })
}

func TestDelay(t *testing.T) {
	u := startUpstream(t)
	p := newProxy(t, u.addr())
	c := dial(t, p.Addr())
	if got, err := roundTrip(c, "warm", 5*time.Second); err != nil || got != "warm" {
		t.Fatalf("pass: %q %v", got, err)
	}

	const d = 50 * time.Millisecond
	p.SetDelay(d)
	if p.Mode() != Delay {
		t.Fatalf("mode %v", p.Mode())
	}
	start := time.Now()
	if got, err := roundTrip(c, "slow", 5*time.Second); err != nil || got != "slow" {
		t.Fatalf("delay: %q %v", got, err)
	}
	// Delayed once each way.
	if rtt := time.Since(start); rtt < 2*d {
		t.Fatalf("round trip took %v with %v each way", rtt, d)
	}
	// A new connection is delayed too.
	c2 := dial(t, p.Addr())
	start = time.Now()
	if got, err := roundTrip(c2, "new", 5*time.Second); err != nil || got != "new" {
		t.Fatalf("delay, new connection: %q %v", got, err)
	}
	if rtt := time.Since(start); rtt < 2*d {
		t.Fatalf("new connection: round trip took %v with %v each way", rtt, d)
	}

	// A chunk held under a long delay goes out as soon as the delay lifts.
	p.SetDelay(time.Hour)
	if _, err := roundTrip(c, "held", 200*time.Millisecond); !isTimeout(err) {
		t.Fatalf("under an hour of delay: %v, want a timeout", err)
	}
	p.Set(Pass)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "held" {
		t.Fatalf("after lifting the delay: %q %v", buf, err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestBlackHoleHoldsCurrentAndNewConnections(t *testing.T) {
	u := startUpstream(t)
	p := newProxy(t, u.addr())
	c := dial(t, p.Addr())
	if got, err := roundTrip(c, "before", 5*time.Second); err != nil || got != "before" {
		t.Fatalf("pass: %q %v", got, err)
	}

	p.Set(BlackHole)
	// An existing connection: bytes go nowhere, and a close goes nowhere
	// either (no FIN, no RST): the reader just waits.
	_, err := roundTrip(c, "lost?", 300*time.Millisecond)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("black-holed connection: read %v, want a timeout", err)
	}
	// A new connection is accepted and held: the target never sees it.
	before := u.accepted.Load()
	c2 := dial(t, p.Addr())
	_, err = roundTrip(c2, "new", 300*time.Millisecond)
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("new black-holed connection: read %v, want a timeout", err)
	}
	if n := u.accepted.Load(); n != before {
		t.Fatalf("the target saw %d connections during the black-hole", n-before)
	}
	// The target closing its end is not passed on either.
	u.mu.Lock()
	u.conns[0].Close()
	u.mu.Unlock()
	c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if _, err := c.Read(make([]byte, 1)); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("black-holed close: read %v, want a timeout", err)
	}

	// Lifted: the held connection reaches the target and its bytes flow.
	p.Set(Pass)
	c2.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 3)
	if _, err := io.ReadFull(c2, buf); err != nil || string(buf) != "new" {
		t.Fatalf("held connection after the black-hole: %q %v", buf, err)
	}
	if got, err := roundTrip(c2, "again", 5*time.Second); err != nil || got != "again" {
		t.Fatalf("held connection after the black-hole: %q %v", got, err)
	}
}

func TestResetCurrentAndNewConnections(t *testing.T) {
	u := startUpstream(t)
	p := newProxy(t, u.addr())
	c := dial(t, p.Addr())
	if got, err := roundTrip(c, "before", 5*time.Second); err != nil || got != "before" {
		t.Fatalf("pass: %q %v", got, err)
	}

	p.Set(Reset)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("existing connection: read %v, want ECONNRESET", err)
	}
	// The target's side is reset too.
	select {
	case err := <-u.readErrs:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("target side: %v, want ECONNRESET", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the target's connection was not reset")
	}
	// New connections are reset as soon as accepted.
	for range 3 {
		if err := dialAndRead(p.Addr()); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("new connection: %v, want ECONNRESET", err)
		}
	}
	waitFor(t, "no connection left", func() bool { return p.Conns() == 0 })

	p.Set(Pass)
	c3 := dial(t, p.Addr())
	if got, err := roundTrip(c3, "after", 5*time.Second); err != nil || got != "after" {
		t.Fatalf("after the reset: %q %v", got, err)
	}
}

func TestPeerResetIsPassedOn(t *testing.T) {
	u := startUpstream(t)
	p := newProxy(t, u.addr())
	c := dial(t, p.Addr())
	if got, err := roundTrip(c, "x", 5*time.Second); err != nil || got != "x" {
		t.Fatalf("pass: %q %v", got, err)
	}
	rst(c)
	select {
	case err := <-u.readErrs:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("target side: %v, want ECONNRESET", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the reset was not passed on")
	}
}

func TestUnreachableTargetResets(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now
	p := newProxy(t, addr)
	if err := dialAndRead(p.Addr()); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("got %v, want ECONNRESET", err)
	}
}

// dialAndRead connects to addr and reads one byte: the error says how the
// connection ended (a reset may come before connect returns).
func dialAndRead(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c.Read(make([]byte, 1))
	return err
}

func TestCloseStopsEverything(t *testing.T) {
	u := startUpstream(t)
	p, err := New(u.addr())
	if err != nil {
		t.Fatal(err)
	}
	c1 := dial(t, p.Addr())
	if got, err := roundTrip(c1, "x", 5*time.Second); err != nil || got != "x" {
		t.Fatalf("pass: %q %v", got, err)
	}
	p.Set(BlackHole)
	c2 := dial(t, p.Addr()) // held, not connected
	io.WriteString(c1, "held")
	waitFor(t, "both connections accepted", func() bool { return p.Accepted() == 2 })

	done := make(chan error, 1)
	go func() { done <- p.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return")
	}
	for i, c := range []net.Conn{c1, c2} {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := c.Read(make([]byte, 1))
		var ne net.Error
		if err == nil || (errors.As(err, &ne) && ne.Timeout()) {
			t.Fatalf("connection %d after Close: read %v, want it closed", i, err)
		}
	}
	if c, err := net.DialTimeout("tcp", p.Addr(), time.Second); err == nil {
		c.Close()
		t.Fatal("the proxy still accepts after Close")
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestModeString(t *testing.T) {
	for m, want := range map[Mode]string{Pass: "pass", Delay: "delay", BlackHole: "black-hole", Reset: "reset", 9: "Mode(9)"} {
		if got := m.String(); got != want {
			t.Errorf("%d: %q, want %q", int(m), got, want)
		}
	}
}
