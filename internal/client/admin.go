package client

import (
	"net/http"
	"sort"
	"time"

	"wsp/internal/admin"
)

// targetState is one target as /api/stats shows it.
type targetState struct {
	Target    string    `json:"target"`               // without user info
	Connected bool      `json:"connected"`            // at least one session up
	Since     time.Time `json:"since,omitzero"`       // legacy: since when a connection is up
	LastError string    `json:"last_error,omitempty"` // why the last attempt or session ended, while none is up

	// v2 targets: each session kept, and how they were found.
	Addresses    []string       `json:"addresses,omitempty"`     // what the host name resolved to (discovery)
	ResolveError string         `json:"resolve_error,omitempty"` // why the last lookup failed
	Nodes        int            `json:"nodes,omitempty"`         // how many nodes the servers say there are (X-Wsp-Nodes)
	Sessions     []sessionState `json:"sessions,omitempty"`
}

// sessionState is one session a v2 target keeps up, or tries to.
type sessionState struct {
	Address   string    `json:"address,omitempty"` // the address dialed (discovery)
	Extra     bool      `json:"extra,omitempty"`   // opened to reach the servers' node count
	Node      string    `json:"node,omitempty"`    // the server node it landed on
	Connected bool      `json:"connected"`
	Session   string    `json:"session,omitempty"`
	Since     time.Time `json:"since,omitzero"`
	Draining  bool      `json:"draining,omitempty"` // no longer needed: in-flight requests finish
	LastError string    `json:"last_error,omitempty"`
}

func (c *Client) setTarget(target string, st targetState) {
	c.mu.Lock()
	c.targets[target] = st
	c.mu.Unlock()
}

// AdminHandler serves the client's operators' listener: /metrics, /healthz,
// /readyz (at least one session up), /status, /api/stats and /debug/pprof/.
func (c *Client) AdminHandler() http.Handler {
	mux := admin.NewMux()
	mux.Handle("GET /metrics", c.metrics.Handler())
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { admin.Text(w, http.StatusOK, "ok") })
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) { admin.Text(w, http.StatusOK, "ok") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if !c.Ready() {
			admin.Text(w, http.StatusServiceUnavailable, "no session up")
			return
		}
		admin.Text(w, http.StatusOK, "ok")
	})
	mux.HandleFunc("GET /api/stats", func(w http.ResponseWriter, r *http.Request) {
		c.mu.Lock()
		list := make([]targetState, 0, len(c.targets))
		for _, t := range c.targets {
			list = append(list, t)
		}
		c.mu.Unlock()
		sort.Slice(list, func(i, j int) bool { return list[i].Target < list[j].Target })
		admin.JSON(w, map[string]any{"id": c.cfg.ID, "version": Version, "targets": list})
	})
	return mux
}
