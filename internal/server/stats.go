package server

import (
	"sort"
	"time"
)

// SessionInfo describes one connected client session.
type SessionInfo struct {
	Client    string     `json:"client"`
	Session   string     `json:"session"`
	Remote    string     `json:"remote"`
	Version   string     `json:"version"`
	Since     time.Time  `json:"since"`
	InFlight  int64      `json:"in_flight"`
	Requests  int64      `json:"requests"`
	BytesIn   int64      `json:"bytes_in"`
	BytesOut  int64      `json:"bytes_out"`
	LastError *ErrorInfo `json:"last_error,omitempty"`
}

// ClientInfo is a client id and its sessions.
type ClientInfo struct {
	ID       string        `json:"id"`
	Sessions []SessionInfo `json:"sessions"`
}

// Stats is a snapshot of the server's state, as /api/stats serves it.
type Stats struct {
	Version      string        `json:"version"`
	Uptime       float64       `json:"uptime_seconds"`
	Draining     bool          `json:"draining"`
	Clients      int           `json:"clients"`
	SessionCount int           `json:"sessions"`
	Sessions     []SessionInfo `json:"-"` // per client in /api/clients
	InFlight     int64         `json:"in_flight"`
	Waiting      int           `json:"waiting"` // requests waiting for a session able to serve them
	Requests     int64         `json:"requests_total"`
	Errors       int64         `json:"errors_total"`
	BytesIn      int64         `json:"bytes_in"`
	BytesOut     int64         `json:"bytes_out"`
	RecentErrors []ErrorInfo   `json:"recent_errors"`
	Cluster      *ClusterStats `json:"cluster,omitempty"` // with cluster.redis
}

// Version is reported by /api/stats; cmd/wsp sets it.
var Version = "dev"

// Stats returns a snapshot of the connected sessions and the totals.
func (s *Server) Stats() Stats {
	all := s.reg.sessions()
	st := Stats{
		Version:      Version,
		Uptime:       time.Since(s.started).Seconds(),
		Draining:     s.draining.Load(),
		Sessions:     make([]SessionInfo, 0, len(all)),
		Waiting:      int(s.reg.waiters.Load()),
		Requests:     s.totals.requests.Load(),
		Errors:       s.totals.errors.Load(),
		BytesIn:      s.totals.bytesIn.Load(),
		BytesOut:     s.totals.bytesOut.Load(),
		RecentErrors: s.errors.list(),
		SessionCount: len(all),
		Cluster:      s.clusterStats(),
	}
	ids := map[string]bool{}
	for _, x := range all {
		info := sessionInfo(x)
		st.InFlight += info.InFlight
		st.Sessions = append(st.Sessions, info)
		ids[x.clientID] = true
	}
	st.Clients = len(ids)
	return st
}

func sessionInfo(x *session) SessionInfo {
	return SessionInfo{
		Client:    x.clientID,
		Session:   x.id,
		Remote:    x.remote,
		Version:   x.version,
		Since:     x.since,
		InFlight:  x.inflight.Load(),
		Requests:  x.requests.Load(),
		BytesIn:   x.bytesIn.Load(),
		BytesOut:  x.bytesOut.Load(),
		LastError: x.lastErr.Load(),
	}
}

// ClientsInfo lists the connected clients, by id, each with its sessions.
func (s *Server) ClientsInfo() []ClientInfo {
	by := map[string][]SessionInfo{}
	for _, x := range s.reg.sessions() {
		by[x.clientID] = append(by[x.clientID], sessionInfo(x))
	}
	out := make([]ClientInfo, 0, len(by))
	for id, list := range by {
		sort.Slice(list, func(i, j int) bool { return list[i].Since.Before(list[j].Since) })
		out = append(out, ClientInfo{ID: id, Sessions: list})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}
