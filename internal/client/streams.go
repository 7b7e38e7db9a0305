package client

import (
	"net"
	"sync"
)

// streamState is where a stream is in its life on this side.
type streamState int

const (
	streamFresh streamState = iota // accepted; its first request not begun
	streamBusy                     // in an exchange
	streamIdle                     // between exchanges
)

// streamSet tracks a session's streams so a drain can close those between
// exchanges without racing one that is starting, and wait for the others.
type streamSet struct {
	mu       sync.Mutex
	state    map[net.Conn]streamState // guarded by mu: open streams
	busy     int                      // guarded by mu: fresh streams and streams in an exchange
	draining bool                     // guarded by mu: no exchange may begin on a reused stream
}

func newStreamSet() *streamSet {
	return &streamSet{state: map[net.Conn]streamState{}}
}

// add tracks a stream just accepted. The server opens a stream to send a
// request at once, so a fresh one counts as in flight: a drain that began
// meanwhile waits for it.
func (s *streamSet) add(st net.Conn) {
	s.mu.Lock()
	s.state[st] = streamFresh
	s.busy++
	s.mu.Unlock()
}

func (s *streamSet) remove(st net.Conn) {
	s.mu.Lock()
	if state, ok := s.state[st]; ok && state != streamIdle {
		s.busy--
	}
	delete(s.state, st)
	s.mu.Unlock()
}

// begin marks st busy. It is false when draining and st is a reused
// stream, which then must not execute the request it holds: the server,
// seeing the stream closed unanswered, sends the request elsewhere. A
// fresh stream's first request always begins: the server opened the stream
// for it before it saw the drain's GoAway, and the drain serves it.
func (s *streamSet) begin(st net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.state[st] == streamFresh:
	case s.draining:
		return false
	default:
		s.busy++
	}
	s.state[st] = streamBusy
	return true
}

func (s *streamSet) end(st net.Conn) {
	s.mu.Lock()
	s.state[st] = streamIdle
	s.busy--
	s.mu.Unlock()
}

// inflight counts the streams a drain waits for: in an exchange, or fresh.
func (s *streamSet) inflight() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.busy
}

// drain stops new exchanges on reused streams and closes the streams
// between exchanges, so the server stops reusing them.
func (s *streamSet) drain() {
	s.mu.Lock()
	s.draining = true
	var idle []net.Conn
	for st, state := range s.state {
		if state == streamIdle {
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
	for st := range s.state {
		stopReading(st)
	}
}
