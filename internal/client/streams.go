package client

import (
	"net"
	"sync"
)

// streamSet tracks a session's streams so a drain can close those between
// exchanges without racing one that is starting.
type streamSet struct {
	mu       sync.Mutex
	idle     map[net.Conn]bool // guarded by mu: open streams; true between exchanges
	busy     int               // guarded by mu: streams in an exchange
	draining bool              // guarded by mu: no exchange may begin
}

func newStreamSet() *streamSet {
	return &streamSet{idle: map[net.Conn]bool{}}
}

func (s *streamSet) add(st net.Conn) {
	s.mu.Lock()
	s.idle[st] = true
	s.mu.Unlock()
}

func (s *streamSet) remove(st net.Conn) {
	s.mu.Lock()
	delete(s.idle, st)
	s.mu.Unlock()
}

// begin marks st busy; false when draining, and then st must not execute
// the request it holds: the server, seeing the stream closed unanswered,
// sends the request elsewhere.
func (s *streamSet) begin(st net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining {
		return false
	}
	s.idle[st] = false
	s.busy++
	return true
}

func (s *streamSet) end(st net.Conn) {
	s.mu.Lock()
	s.idle[st] = true
	s.busy--
	s.mu.Unlock()
}

func (s *streamSet) inflight() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.busy
}

// drain stops new exchanges and closes the streams between exchanges, so
// the server stops reusing them.
func (s *streamSet) drain() {
	s.mu.Lock()
	s.draining = true
	var idle []net.Conn
	for st, ok := range s.idle {
		if ok {
			idle = append(idle, st)
		}
	}
	s.mu.Unlock()
	for _, st := range idle { // closing writes a frame: never under mu
		st.Close()
		stopReading(st)
	}
}

// stopReading ends every read of every stream: the session is closing.
func (s *streamSet) stopReading() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for st := range s.idle {
		stopReading(st)
	}
}
