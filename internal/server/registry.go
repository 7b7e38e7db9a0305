package server

import (
	"context"
	"math/rand/v2"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"wsp/internal/httperr"
	"wsp/internal/rules"
	"wsp/internal/tunnel"
)

// conn is what a session runs on: a wsp.v2 multiplexed session, or an old
// client's one-request-at-a-time WebSocket.
type conn interface {
	CloseChan() <-chan struct{}
	Err() error             // why it ended, once it has
	IdleFor() time.Duration // since anything, keepalives included, arrived
	Close() error
}

// session is one registered client connection as the server tracks it.
type session struct {
	conn
	mux        *tunnel.Session // wsp.v2; nil for a legacy client
	legacy     *legacyConn     // root-gg/wsp protocol; nil for wsp.v2
	clientID   string
	id         string // short random id, in logs and the 101 answer
	remote     string
	version    string
	since      time.Time
	maxStreams int64
	rules      *rules.Set // what the client said it accepts

	inflight atomic.Int64 // exchanges in progress; at most maxStreams
	requests atomic.Int64 // exchanges ever started
	bytesIn  atomic.Int64 // app body bytes relayed to the client, counted at each exchange's end
	bytesOut atomic.Int64 // answer bytes relayed to apps, likewise
	lastErr  atomic.Pointer[ErrorInfo]
	gone     atomic.Bool // closed, or the client said go away: never picked again
	ended    atomic.Bool // endSession ran
	tending  atomic.Bool // a keepalive ping or idle-stream sweep is under way (tend)

	mu   sync.Mutex
	idle []idleStream // guarded by mu; oldest first. len(idle)+inflight <= maxStreams
}

// acquire reserves a stream slot; false when the session is full or gone.
func (s *session) acquire() bool {
	for {
		n := s.inflight.Load()
		if n >= s.maxStreams || s.gone.Load() {
			return false
		}
		if s.inflight.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// registry holds the connected sessions by client id and hands them out to
// requests.
type registry struct {
	mu sync.RWMutex
	// pools maps a client id to its sessions. The slices are copied on
	// write, so a reader may keep one after unlocking. Guarded by mu.
	pools map[string][]*session
	// all lists every session, for requests that name no client. Copied on
	// write; guarded by mu.
	all []*session
	// changed is closed and replaced when a session is added or a stream
	// slot frees up while someone waits. Guarded by mu.
	changed chan struct{}
	waiters atomic.Int32 // requests blocked in pick
}

func newRegistry() *registry {
	return &registry{pools: map[string][]*session{}, changed: make(chan struct{})}
}

func (r *registry) add(s *session) {
	r.mu.Lock()
	r.pools[s.clientID] = append(slices.Clip(r.pools[s.clientID]), s)
	r.all = append(slices.Clip(r.all), s)
	r.broadcastLocked()
	r.mu.Unlock()
}

// room refuses a new session of id when the server already holds max in
// all or maxPerID with that id. Checked before the upgrade, so a burst may
// overshoot by the registrations in flight at once.
func (r *registry) room(id string, max, maxPerID int) *httperr.Error {
	r.mu.RLock()
	all, pool := r.all, r.pools[id]
	r.mu.RUnlock()
	// Sessions that closed since the reaper's last look do not count: a
	// client at its limit that reconnects at once must find room. Counted
	// one by one only near the limits.
	total, mine := len(all), len(pool)
	if total >= max {
		total = live(all)
	}
	if mine >= maxPerID {
		mine = live(pool)
	}
	switch {
	case total >= max:
		return httperr.New(http.StatusServiceUnavailable, httperr.SessionLimit, "the server holds its maximum of %d client sessions (maxsessions)", max)
	case mine >= maxPerID:
		return httperr.New(http.StatusServiceUnavailable, httperr.SessionLimit, "the server holds its maximum of %d sessions for client id %q (maxsessionsperid)", maxPerID, id)
	}
	return nil
}

// clear removes every session at once and returns them: at shutdown,
// removing 10,000 sessions one by one would copy the lists each time.
func (r *registry) clear() []*session {
	r.mu.Lock()
	defer r.mu.Unlock()
	all := r.all
	for _, s := range all {
		s.gone.Store(true)
	}
	r.all = nil
	r.pools = map[string][]*session{}
	return all
}

// live counts the sessions of list whose connection is still open.
func live(list []*session) int {
	n := 0
	for _, s := range list {
		select {
		case <-s.CloseChan():
		default:
			n++
		}
	}
	return n
}

// remove drops s and returns how many sessions its client id has left.
func (r *registry) remove(s *session) int {
	s.gone.Store(true)
	r.mu.Lock()
	defer r.mu.Unlock()
	p := without(r.pools[s.clientID], s)
	if len(p) > 0 {
		r.pools[s.clientID] = p
	} else {
		delete(r.pools, s.clientID)
	}
	r.all = without(r.all, s)
	return len(p)
}

// without returns a copy of list without s.
func without(list []*session, s *session) []*session {
	out := make([]*session, 0, len(list))
	for _, x := range list {
		if x != s {
			out = append(out, x)
		}
	}
	return out
}

// release frees a stream slot taken by acquire.
func (r *registry) release(s *session) {
	s.inflight.Add(-1)
	if r.waiters.Load() > 0 {
		r.mu.Lock()
		r.broadcastLocked()
		r.mu.Unlock()
	}
}

func (r *registry) broadcastLocked() {
	close(r.changed)
	r.changed = make(chan struct{})
}

// sessions returns a snapshot of every session.
func (r *registry) sessions() []*session {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.all
}

// clientIDs returns the ids with at least one session, for the cluster
// directory.
func (r *registry) clientIDs() []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	ids := make([]string, 0, len(r.pools))
	for id := range r.pools {
		ids = append(ids, id)
	}
	return ids
}

// holds reports whether a session here could serve w, busy or not: a
// session of the named pool, or for any client one whose rules accept it.
// A cluster node forwards the requests it does not hold.
func (r *registry) holds(w wanted) bool {
	r.mu.RLock()
	list := r.all
	if w.clientID != "" {
		list = r.pools[w.clientID]
	}
	r.mu.RUnlock()
	for _, c := range list {
		if !c.gone.Load() && (w.clientID != "" || w.accepts == nil || w.accepts(c)) {
			return true
		}
	}
	return false
}

// wanted says which sessions may serve a request.
type wanted struct {
	clientID string // the pool the app or a route named; "" = any client
	// accepts reports whether a session's advertised rules let it serve
	// the request; nil accepts all. Consulted for any-client requests only:
	// a named pool's client is asked, and refuses itself if it must.
	accepts func(*session) bool
	dest    string // the destination, for errors
	// scope completes "no client is connected" in a cluster: " to any
	// node", or why only this node was looked at.
	scope string
}

// pick reserves a stream slot on a session able to serve w, skipping the
// sessions in tried. It waits up to timeout for one to connect or free up,
// then fails with 503 (nobody connected), 504 (everybody busy) or 403
// (everybody connected refuses the destination).
func (r *registry) pick(ctx context.Context, w wanted, tried []*session, timeout time.Duration) (*session, error) {
	var timer *time.Timer
	accepts := w.accepts
	if w.clientID != "" {
		accepts = nil
	}
	for {
		// Count as a waiter before looking, so a slot freed between the
		// look and the wait still wakes us.
		r.waiters.Add(1)
		r.mu.RLock()
		candidates := r.all
		if w.clientID != "" {
			candidates = r.pools[w.clientID]
		}
		changed := r.changed
		r.mu.RUnlock()

		s, busy, refused := choose(candidates, w.clientID == "", tried, accepts)
		if s != nil {
			r.waiters.Add(-1)
			return s, nil
		}
		if refused > 0 && busy == 0 {
			// Waiting would not help: the connected clients said in their
			// hello that they refuse this destination.
			r.waiters.Add(-1)
			return nil, httperr.New(http.StatusForbidden, httperr.ClientRefused, "refused by the rules of every connected client (%d sessions): %s", refused, w.dest)
		}
		if timer == nil {
			timer = time.NewTimer(timeout)
			defer timer.Stop()
		}
		select {
		case <-changed:
			r.waiters.Add(-1)
		case <-ctx.Done():
			r.waiters.Add(-1)
			return nil, ctx.Err()
		case <-timer.C:
			r.waiters.Add(-1)
			return nil, noSession(w, busy)
		}
	}
}

func noSession(w wanted, busy int) error {
	clientID := w.clientID
	switch {
	case busy > 0 && clientID != "":
		return httperr.New(http.StatusGatewayTimeout, httperr.ClientBusy, "timed out waiting for a free stream: all %d sessions of client %q are at their limit", busy, clientID)
	case busy > 0:
		return httperr.New(http.StatusGatewayTimeout, httperr.ClientBusy, "timed out waiting for a free stream: all %d client sessions able to serve it are at their limit", busy)
	case clientID != "":
		return httperr.New(http.StatusServiceUnavailable, httperr.NoClient, "no client with id %q is connected%s", clientID, w.scope)
	default:
		return httperr.New(http.StatusServiceUnavailable, httperr.NoClient, "no client is connected%s", w.scope)
	}
}

// choose reserves a slot on the least loaded usable session that accepts
// the request (accepts nil: all do). With sample set (requests that name no
// client, over possibly thousands of sessions) it compares two random
// sessions instead of scanning them all, and scans only when both are
// unusable. busy counts sessions that were full, refused those whose rules
// refuse the request.
func choose(list []*session, sample bool, tried []*session, accepts func(*session) bool) (s *session, busy, refused int) {
	usable := func(c *session) bool {
		for _, t := range tried {
			if t == c {
				return false
			}
		}
		return !c.gone.Load()
	}
	ok := func(c *session) bool { return accepts == nil || accepts(c) }
	if sample && len(list) > 2 {
		a, b := list[rand.IntN(len(list))], list[rand.IntN(len(list))]
		if b.inflight.Load() < a.inflight.Load() {
			a, b = b, a
		}
		for _, c := range [...]*session{a, b} {
			if usable(c) && ok(c) && c.acquire() {
				return c, 0, 0
			}
		}
	}
	for {
		var best *session
		busy, refused = 0, 0
		for _, c := range list {
			if !usable(c) {
				continue
			}
			if !ok(c) {
				refused++
				continue
			}
			n := c.inflight.Load()
			if n >= c.maxStreams {
				busy++
				continue
			}
			if best == nil || n < best.inflight.Load() {
				best = c
			}
		}
		if best == nil {
			return nil, busy, refused
		}
		if best.acquire() {
			return best, 0, 0
		}
		// Lost a race for its last slot: look again.
	}
}
