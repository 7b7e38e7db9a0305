package client

import (
	"net"
	"testing"
)

// A drain waits for a stream from its accept on, and lets its first
// request begin: the server opened it for that request before it saw the
// GoAway. A reused stream's next request is refused.
func TestStreamSetDrain(t *testing.T) {
	s := newStreamSet()
	fresh, _ := net.Pipe()
	reused, _ := net.Pipe()
	defer fresh.Close()
	defer reused.Close()
	s.add(reused)
	if !s.begin(reused) {
		t.Fatal("begin refused before the drain")
	}
	s.end(reused)
	s.add(fresh)
	if n := s.inflight(); n != 1 {
		t.Fatalf("inflight = %d with one fresh stream, want 1", n)
	}
	s.drain()
	if s.begin(reused) {
		t.Error("a reused stream began an exchange while draining")
	}
	if !s.begin(fresh) {
		t.Fatal("a fresh stream's first request was refused while draining")
	}
	if n := s.inflight(); n != 1 {
		t.Fatalf("inflight = %d during the fresh stream's exchange, want 1", n)
	}
	s.end(fresh)
	if n := s.inflight(); n != 0 {
		t.Fatalf("inflight = %d after it, want 0", n)
	}
	// A fresh stream that ends without a request stops counting.
	other, _ := net.Pipe()
	defer other.Close()
	s.add(other)
	s.remove(other)
	s.remove(reused)
	if n := s.inflight(); n != 0 {
		t.Fatalf("inflight = %d after removals, want 0", n)
	}
}
