package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"wsp/internal/config"
	"wsp/internal/tunnel"
)

// One configured target can stand for several server nodes (docs/scaling.md,
// pattern 1). A targetGroup runs one target: it keeps a slot per address
// the target's host name resolves to, re-resolving every discovery
// interval, or a single slot that dials the target as given (an IP
// literal, discovery 0). Each slot keeps one session up and reconnects with
// back-off, as a target did before discovery.
//
// When the servers say how many nodes there are (X-Wsp-Nodes) and the
// address slots are fewer, the group adds extra slots, dialed through its
// addresses in turn, one at a time: a load balancer in front of N nodes
// then spreads them over all N. A session that lands on a node another
// session of the target holds is not kept (servers name themselves in
// X-Wsp-Node). While some node is missing its slot tries again after a
// back-off, as Kubernetes' Konnectivity agent does, for a round of
// attempts, then pauses; with no node missing (two addresses of one node)
// it tries again at the discovery interval.

// Resolver looks up the addresses of a target's host name. *net.Resolver
// is one; tests inject their own.
type Resolver interface {
	LookupHost(ctx context.Context, host string) (addrs []string, err error)
}

const (
	// maxNodesHint bounds the sessions a server's X-Wsp-Nodes can make the
	// client hold per target.
	maxNodesHint = 256
	// maxAddresses bounds the sessions one DNS answer can make the client
	// hold per target.
	maxAddresses = 256
	// resolveTimeout bounds one lookup.
	resolveTimeout = 10 * time.Second
	// maxNodeName bounds a node name kept from a server's answer.
	maxNodeName = 128
)

// retired is why a slot was stopped while the client runs on: its session
// drains as on shutdown, and serve reports this as the cause.
type retired struct{ reason string }

func (r retired) Error() string { return r.reason }

// targetGroup runs one v2 target: its slots, and the discovery of its
// addresses. run's goroutine owns it; the slot goroutines it starts report
// back through mu and wake.
type targetGroup struct {
	c        *Client
	target   string // as configured
	name     string // without user info, for logs and stats
	host     string // the host name to resolve; "" = dial the target as given
	resolver Resolver
	interval time.Duration // discovery: how often host is looked up again
	// heldWait is the pause after a round of sessions that all landed on
	// nodes the target holds: the discovery interval or the back-off cap,
	// whichever is longer. With a node count no live node set can reach,
	// slots looking for the missing nodes then cost the servers a few
	// handshakes per pause, not one per back-off step each.
	heldWait time.Duration
	backoff  func(failures int) time.Duration // the reconnect back-off; tests shorten it
	wake     chan struct{}                    // capacity 1: the book changed, run plans extras again
	running  sync.WaitGroup                   // slot goroutines; Add only from run's goroutine

	mu         sync.Mutex
	book       book   // guarded by mu
	resolveErr string // guarded by mu: why the last lookup failed; "" after a good one
	truncated  bool   // guarded by mu: told the log the answer had too many addresses
	// logged holds the classes of the connection failures logged since a
	// session of the target last came up, so each is logged once (then
	// at debug) however many slots meet it, in whatever order.
	logged     map[string]bool // guarded by mu
	loggedHint int             // guarded by mu: the node count the last "opening more sessions" line gave
	// sessionEnded is closed, and replaced, when a session of the target
	// ends: an address slot waiting because its node was held elsewhere
	// tries again at once. Guarded by mu.
	sessionEnded chan struct{}
}

// redundantWaits is how many discovery intervals an address slot waits
// after landing on a node another address holds (A and AAAA records of one
// server), unless a session of the target ends first: each attempt costs
// the server a connect/disconnect pair of log lines.
const redundantWaits = 10

func newTargetGroup(c *Client, target string) (*targetGroup, error) {
	u, err := url.Parse(wsURL(target))
	if err != nil {
		return nil, fmt.Errorf("target %s: %w", config.RedactURL(target), err)
	}
	g := &targetGroup{
		c:        c,
		target:   target,
		name:     config.RedactURL(target),
		resolver: c.Resolver,
		interval: c.cfg.Discovery.D(),
		heldWait: max(c.cfg.Discovery.D(), backoffCap),
		backoff:  backoff,
		wake:     make(chan struct{}, 1),
		logged:   map[string]bool{},

		sessionEnded: make(chan struct{}),
	}
	if g.resolver == nil {
		g.resolver = net.DefaultResolver
	}
	if host := u.Hostname(); c.cfg.Discovery.D() > 0 && !isIPLiteral(host) {
		g.host = host
	}
	return g, nil
}

// isIPLiteral reports whether host is an IP address (a zone allowed)
// rather than a name to resolve.
func isIPLiteral(host string) bool {
	_, err := netip.ParseAddr(host)
	return err == nil
}

// run keeps the target's slots until ctx ends, and returns once each has
// drained its session.
func (g *targetGroup) run(ctx context.Context) {
	defer g.publish()
	defer g.running.Wait()
	interval := g.interval
	var resolveAt <-chan time.Time // nil without discovery: never ready
	var timer *time.Timer
	if g.host == "" {
		g.setAddrs(ctx, []string{""})
	} else {
		timer = time.NewTimer(0)
		defer timer.Stop()
		resolveAt = timer.C
	}
	failures := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-resolveAt:
			if g.resolve(ctx) {
				failures = 0
				timer.Reset(interval)
				continue
			}
			failures++
			// Until a first answer there is nothing to dial: retry sooner
			// than the interval, with back-off.
			delay := interval
			if !g.hasAddrs() {
				delay = min(interval, g.backoff(failures))
			}
			timer.Reset(delay)
		case <-g.wake:
			g.planExtras(ctx)
		}
	}
}

// hasAddrs reports whether the target has addresses to dial.
func (g *targetGroup) hasAddrs() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.book.addresses()) > 0
}

// resolve looks the host name up and follows the answer; a failed lookup,
// or one without a usable address, keeps the sessions as they are and is
// logged once per distinct cause.
func (g *targetGroup) resolve(ctx context.Context) bool {
	lctx, cancel := context.WithTimeout(ctx, resolveTimeout)
	raw, err := g.resolver.LookupHost(lctx, g.host)
	cancel()
	if ctx.Err() != nil {
		return false
	}
	addrs, dropped := normalizeAddrs(raw)
	if err == nil && len(addrs) == 0 {
		err = errors.New("the name resolved to no IP address")
	}
	if err != nil {
		cause := fmt.Sprintf("resolve %s: %v", g.host, err)
		g.mu.Lock()
		changed := cause != g.resolveErr
		g.resolveErr = cause
		g.mu.Unlock()
		if changed {
			g.c.log.Warn("cannot resolve target; keeping the sessions up and retrying", "target", g.name, "cause", cause)
		}
		g.publish()
		return false
	}
	g.mu.Lock()
	recovered := g.resolveErr != ""
	warnTruncated := dropped > 0 && !g.truncated
	g.resolveErr, g.truncated = "", dropped > 0
	g.mu.Unlock()
	if recovered {
		g.c.log.Info("target resolves again", "target", g.name, "addresses", len(addrs))
	}
	if warnTruncated {
		g.c.log.Warn("target resolves to more addresses than the client holds sessions to; using the first ones", "target", g.name, "addresses", len(addrs)+dropped, "limit", maxAddresses)
	}
	g.setAddrs(ctx, addrs)
	return true
}

// normalizeAddrs keeps the IP addresses of a lookup, each once, sorted, at
// most maxAddresses of them; dropped counts those beyond.
func normalizeAddrs(raw []string) (addrs []string, dropped int) {
	var ips []netip.Addr
	for _, r := range raw {
		if ip, err := netip.ParseAddr(r); err == nil {
			ips = append(ips, ip.Unmap())
		}
	}
	slices.SortFunc(ips, netip.Addr.Compare)
	ips = slices.Compact(ips)
	if len(ips) > maxAddresses {
		dropped = len(ips) - maxAddresses
		ips = ips[:maxAddresses]
	}
	for _, ip := range ips {
		addrs = append(addrs, ip.String())
	}
	return addrs, dropped
}

// setAddrs makes the slots follow addrs ("" = the target as given).
func (g *targetGroup) setAddrs(ctx context.Context, addrs []string) {
	g.mu.Lock()
	added, retire := g.book.syncAddrs(addrs)
	g.start(ctx, added)
	g.mu.Unlock()
	if g.host != "" && (len(added) > 0 || len(retire) > 0) {
		g.c.log.Info("target addresses changed", "target", g.name, "addresses", addrs,
			"added", slotAddrs(added), "removed", slotAddrs(retire))
	}
	for _, s := range retire {
		s.stop(retired{"address " + s.addr + " no longer resolved"})
	}
	g.planExtras(ctx)
	g.publish()
}

// errTooManySessions retires extras beyond the servers' node count.
var errTooManySessions = retired{"more sessions than the servers' node count"}

func slotAddrs(slots []*slot) []string {
	var addrs []string
	for _, s := range slots {
		if !s.extra {
			addrs = append(addrs, s.addr)
		}
	}
	return addrs
}

// planExtras adds or retires extra slots after the book changed.
func (g *targetGroup) planExtras(ctx context.Context) {
	g.mu.Lock()
	added, retire := g.book.planExtras()
	g.start(ctx, added)
	hint, distinct := g.book.hint, g.book.distinct()
	announce := len(added) > 0 && hint != g.loggedHint
	if announce {
		g.loggedHint = hint
	}
	g.mu.Unlock()
	if len(added) > 0 {
		// Extras open one at a time: info once per node count, not per
		// extra.
		level := slog.LevelDebug
		if announce {
			level = slog.LevelInfo
		}
		g.c.log.Log(ctx, level, "servers report more nodes than sessions reach; opening more sessions", "target", g.name,
			"nodes", hint, "reached", distinct)
	}
	for _, s := range retire {
		s.stop(errTooManySessions)
	}
	if len(added)+len(retire) > 0 {
		g.publish()
	}
}

// start runs slots, each in a goroutine counted in running. Called with mu
// held, from run's goroutine.
func (g *targetGroup) start(ctx context.Context, slots []*slot) {
	for _, s := range slots {
		sctx, stop := context.WithCancelCause(ctx)
		s.stop = stop
		g.running.Add(1)
		go func() {
			defer g.running.Done()
			defer stop(nil)
			g.runSlot(sctx, s)
			g.mu.Lock()
			g.book.remove(s)
			g.mu.Unlock()
			g.poke()
			g.publish()
		}()
	}
}

// poke asks run to plan the extras again.
func (g *targetGroup) poke() {
	select {
	case g.wake <- struct{}{}:
	default:
	}
}

// runSlot connects s again and again until ctx ends (the client stops or
// the slot is retired).
func (g *targetGroup) runSlot(ctx context.Context, s *slot) {
	c := g.c
	failures := 0 // attempts in a row that brought no session kept: the back-off
	held := 0     // sessions in a row that landed on a node the target holds
	for attempt := 0; ; attempt++ {
		g.mu.Lock()
		via, ok := g.book.via(s)
		g.mu.Unlock()
		if !ok {
			failures++
			g.failed(s, "no address to go through; waiting for the target's name to resolve")
			if !sleep(ctx, g.backoff(failures)) {
				return
			}
			continue
		}
		ws, ans, err := c.handshake(ctx, g.target, via)
		var sess *tunnel.Session
		if err == nil {
			sess, err = tunnel.NewClientSession(ws, c.tunnel)
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			if attempt > 0 {
				c.metrics.Reconnect(false)
			}
			failures++
			g.cannotConnect(ctx, s, via, err)
			if !sleep(ctx, g.backoff(failures)) {
				return
			}
			continue
		}
		ended := g.endedSignal() // before admit: no end may slip between
		switch v, round := g.admit(s, via, ans); v {
		case unwanted:
			g.dismiss(sess, "this client retired the session's slot meanwhile")
			return
		case duplicate, redundant:
			c.metrics.DuplicateNode()
			g.dismiss(sess, "this client already holds a session to this node")
			failures++
			held++
			wait := g.backoff(failures)
			var early <-chan struct{}
			switch {
			case v == redundant && !s.extra && g.interval > 0:
				// This address leads to a node another address holds,
				// and no node is missing: look again much later, or as
				// soon as a session of the target ends (the other
				// address may have stopped working).
				wait, held, failures = redundantWaits*g.interval, 0, 0
				early = ended
			case v == redundant || held >= round:
				wait, held, failures = g.heldWait, 0, 0
			}
			g.landedOnHeld(ctx, s, via, ans, wait)
			if !sleepUnless(ctx, wait, early) {
				return
			}
			continue
		}
		held = 0
		if attempt > 0 && ctx.Err() == nil {
			c.metrics.Reconnect(true)
		}
		c.log.Info("connected", g.slotAttrs(s, via, "node", ans.node, "session", ans.session, "attempts", failures+1)...)
		connected := time.Now()
		c.ready.Add(1)
		c.metrics.Session(1)
		g.publish()
		cause := c.serve(ctx, sess)
		g.ended(s, cause)
		c.metrics.Session(-1)
		c.ready.Add(-1)
		if ctx.Err() != nil {
			c.log.Info("disconnected", g.slotAttrs(s, via, "node", ans.node, "session", ans.session, "cause", cause)...)
			return
		}
		c.log.Warn("disconnected; reconnecting", g.slotAttrs(s, via, "node", ans.node, "session", ans.session, "cause", cause)...)
		// A session that lasted resets the back-off; one dropped at once
		// (a server that accepts, then closes) keeps climbing it.
		if time.Since(connected) > stableSession {
			failures = 0
		}
		failures++
		if !sleep(ctx, g.backoff(failures)) {
			return
		}
	}
}

// dismiss ends a session the target does not keep. The server registered
// it when it answered, and may already have sent a request on it: closing
// the connection at once would break that request. The session goes the
// way of a retired one instead: GoAway (the server sends further requests
// to other sessions, nothing sent), the streams already opened served,
// then a close saying reason.
func (g *targetGroup) dismiss(sess *tunnel.Session, reason string) {
	ctx, cancel := context.WithCancelCause(context.Background())
	cancel(retired{reason})
	g.c.serve(ctx, sess)
}

// slotAttrs are the log attributes naming s, then more.
func (g *targetGroup) slotAttrs(s *slot, via string, more ...any) []any {
	attrs := []any{"target", g.name}
	if via != "" {
		attrs = append(attrs, "address", via)
	}
	if s.extra {
		attrs = append(attrs, "extra", true)
	}
	return append(attrs, more...)
}

// admit asks the book whether s keeps a session that landed on ans.node,
// and how many such sessions in a row make a round.
func (g *targetGroup) admit(s *slot, via string, ans answer) (verdict, int) {
	g.mu.Lock()
	v := g.book.admit(s, via, ans)
	round := g.book.round()
	if v == keep {
		clear(g.logged) // a success: causes met from now on are news
	}
	g.mu.Unlock()
	g.poke()
	return v, round
}

// ended records that s's session ended.
func (g *targetGroup) ended(s *slot, cause string) {
	g.mu.Lock()
	g.book.release(s, cause)
	close(g.sessionEnded)
	g.sessionEnded = make(chan struct{})
	g.mu.Unlock()
	g.poke()
	g.publish()
}

// endedSignal is closed when a session of the target next ends.
func (g *targetGroup) endedSignal() <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.sessionEnded
}

// failed records why s could not connect.
func (g *targetGroup) failed(s *slot, cause string) {
	g.mu.Lock()
	s.lastErr = cause
	g.mu.Unlock()
	g.publish()
}

// firstSince reports whether a failure of class is news: not logged since a
// session of the target last came up. Called with mu held.
func (g *targetGroup) firstSince(class string) bool {
	if g.logged[class] {
		return false
	}
	g.logged[class] = true
	return true
}

// cannotConnect records and logs why s could not connect: a warning the
// first time the target meets the cause (its addresses aside) since a
// session last came up, then at debug, however many slots meet it.
func (g *targetGroup) cannotConnect(ctx context.Context, s *slot, via string, err error) {
	cause := err.Error()
	g.mu.Lock()
	s.lastErr = cause
	first := g.firstSince(causeClass(cause, via))
	othersUp := g.book.anyLive(s)
	g.mu.Unlock()
	g.publish()
	level := slog.LevelDebug
	if first {
		level = slog.LevelWarn
	}
	msg := "cannot connect; retrying with back-off"
	switch {
	case isCertError(err):
		msg = "TLS certificate of the server not accepted; retrying with back-off"
	case othersUp:
		msg = "cannot connect through this address while other sessions of the target are up; retrying with back-off"
	}
	g.c.log.Log(ctx, level, msg, g.slotAttrs(s, via, "cause", cause)...)
}

// causeDuplicate is the class, and log message, of a session that landed
// on a node the target already holds.
const causeDuplicate = "session landed on a node this target already holds; closed it"

// landedOnHeld records and logs that s's session landed on a node the
// target holds, and when s tries again: info the first time since a
// session last came up, then debug.
func (g *targetGroup) landedOnHeld(ctx context.Context, s *slot, via string, ans answer, wait time.Duration) {
	wait = wait.Round(time.Millisecond)
	g.mu.Lock()
	s.lastErr = fmt.Sprintf("landed on node %s, which another session of this target holds; trying again in %s", ans.node, wait)
	first := g.firstSince(causeDuplicate)
	g.mu.Unlock()
	g.publish()
	level := slog.LevelDebug
	if first {
		level = slog.LevelInfo
	}
	g.c.log.Log(ctx, level, causeDuplicate, g.slotAttrs(s, via, "node", ans.node, "nodes", ans.nodes, "retry_in", wait)...)
}

// ipLiteral matches an IPv4 address or a bracketed IPv6 one, with a port
// if any.
var ipLiteral = regexp.MustCompile(`\[[0-9A-Fa-f:.]+(%[^\]]*)?\](:\d+)?|\b\d{1,3}(\.\d{1,3}){3}(:\d+)?\b`)

// causeClass is a failure's cause without the addresses in it, so that
// one cause met through several addresses (a balancer down, a port
// closed on every node) is one class.
func causeClass(cause, via string) string {
	cause = ipLiteral.ReplaceAllString(cause, "ADDR")
	if via != "" {
		cause = strings.ReplaceAll(cause, via, "ADDR")
	}
	return cause
}

// publish stores the target's state for /api/stats. The state is built and
// stored under mu, so an older one never overwrites a newer one.
func (g *targetGroup) publish() {
	g.mu.Lock()
	defer g.mu.Unlock()
	st := targetState{Target: g.name, Nodes: g.book.hint, ResolveError: g.resolveErr}
	if g.host != "" {
		st.Addresses = g.book.addresses()
		if st.Addresses == nil {
			st.Addresses = []string{}
		}
	}
	for _, s := range g.book.slots {
		ss := sessionState{Extra: s.extra, Connected: s.live, Node: s.node, Session: s.session, Since: s.since, Draining: s.retired, LastError: s.lastErr}
		if g.host != "" {
			ss.Address = s.via
			if !s.extra {
				ss.Address = s.addr
			}
		}
		if s.live {
			st.Connected = true
		} else if s.lastErr != "" && !s.retired {
			st.LastError = s.lastErr
		}
		st.Sessions = append(st.Sessions, ss)
	}
	if st.Connected {
		st.LastError = ""
	}
	g.c.setTarget(g.target, st)
}
