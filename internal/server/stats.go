package server

import "time"

// SessionInfo describes one connected client session.
type SessionInfo struct {
	Client   string    `json:"client"`
	Session  string    `json:"session"`
	Remote   string    `json:"remote"`
	Version  string    `json:"version"`
	Since    time.Time `json:"since"`
	InFlight int64     `json:"in_flight"`
	Requests int64     `json:"requests"`
}

// Stats is a snapshot of the server's state.
type Stats struct {
	Sessions []SessionInfo `json:"sessions"`
	Waiting  int           `json:"waiting"` // requests waiting for a session able to serve them
}

// Stats returns a snapshot of the connected sessions.
func (s *Server) Stats() Stats {
	all := s.reg.sessions()
	st := Stats{Sessions: make([]SessionInfo, 0, len(all)), Waiting: int(s.reg.waiters.Load())}
	for _, x := range all {
		st.Sessions = append(st.Sessions, SessionInfo{
			Client:   x.clientID,
			Session:  x.id,
			Remote:   x.remote,
			Version:  x.version,
			Since:    x.since,
			InFlight: x.inflight.Load(),
			Requests: x.requests.Load(),
		})
	}
	return st
}
