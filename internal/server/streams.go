package server

import (
	"time"

	"github.com/hashicorp/yamux"
)

// idleStreamTimeout is how long a stream may wait in a session's idle list
// before it is closed, which frees the client's goroutine serving it.
const idleStreamTimeout = time.Minute

// idleStream is a stream that completed an exchange cleanly and may carry
// the next request, HTTP/1.1 keep-alive style: reusing it spares the frames
// that open and close a stream.
type idleStream struct {
	st    *yamux.Stream
	since time.Time
}

// stream returns a stream for one exchange: the most recently idled one, or
// a new one. reused says which.
func (s *session) stream(fresh bool) (st *yamux.Stream, reused bool, err error) {
	if !fresh {
		s.mu.Lock()
		if n := len(s.idle); n > 0 {
			st = s.idle[n-1].st
			s.idle[n-1] = idleStream{}
			s.idle = s.idle[:n-1]
		}
		s.mu.Unlock()
		if st != nil {
			return st, true, nil
		}
	}
	st, err = s.mux.OpenStream()
	return st, false, err
}

// putIdle keeps st for the next exchange, unless the session already
// keeps as many streams as it may have: called before the exchange's slot
// is released, so inflight still counts it.
func (s *session) putIdle(st *yamux.Stream) {
	s.mu.Lock()
	keep := int64(len(s.idle))+s.inflight.Load() <= s.maxStreams
	if keep {
		s.idle = append(s.idle, idleStream{st: st, since: time.Now()})
	}
	s.mu.Unlock()
	if !keep {
		st.Close()
	}
}

// closeIdleStreams closes the streams idle since before cutoff, which frees
// the client's goroutines waiting on them.
func (s *session) closeIdleStreams(cutoff time.Time) {
	var stale []*yamux.Stream
	s.mu.Lock()
	for len(s.idle) > 0 && s.idle[0].since.Before(cutoff) {
		stale = append(stale, s.idle[0].st)
		s.idle[0] = idleStream{}
		s.idle = s.idle[1:]
	}
	s.mu.Unlock()
	for _, st := range stale { // closing writes a frame: never under mu
		st.Close()
	}
}
