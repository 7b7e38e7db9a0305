package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"slices"
	"sync"
	"time"

	"github.com/gorilla/websocket"

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
// addresses in turn: a load balancer in front of N nodes then spreads them
// over all N. While some node is missing, a session that lands on a node
// another session of the target holds is closed at once and its slot tries
// again after a back-off, as Kubernetes' Konnectivity agent does.

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
	wake     chan struct{}  // capacity 1: the book changed, run plans extras again
	running  sync.WaitGroup // slot goroutines; Add only from run's goroutine

	mu         sync.Mutex
	book       book   // guarded by mu
	resolveErr string // guarded by mu: why the last lookup failed; "" after a good one
	truncated  bool   // guarded by mu: told the log the answer had too many addresses
}

func newTargetGroup(c *Client, target string) (*targetGroup, error) {
	u, err := url.Parse(wsURL(target))
	if err != nil {
		return nil, fmt.Errorf("target %s: %w", redactURL(target), err)
	}
	g := &targetGroup{
		c:        c,
		target:   target,
		name:     redactURL(target),
		resolver: c.Resolver,
		wake:     make(chan struct{}, 1),
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
	interval := g.c.cfg.Discovery.D()
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
				delay = min(interval, backoff(failures))
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
	moreExtras, lessExtras := g.book.planExtras()
	g.start(ctx, added)
	g.start(ctx, moreExtras)
	reasons := make([]error, len(retire))
	for i, s := range retire {
		reasons[i] = retired{"address " + s.addr + " no longer resolved"}
		if s.extra {
			reasons[i] = retired{"went through address " + s.via + ", no longer resolved"}
		}
	}
	g.mu.Unlock()
	if g.host != "" && (len(added) > 0 || len(retire) > 0) {
		g.c.log.Info("target addresses changed", "target", g.name, "addresses", addrs,
			"added", slotAddrs(added), "removed", slotAddrs(retire))
	}
	for i, s := range retire {
		s.stop(reasons[i])
	}
	for _, s := range lessExtras {
		s.stop(errTooManySessions)
	}
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
	g.mu.Unlock()
	if len(added) > 0 {
		g.c.log.Info("servers report more nodes than sessions reach; opening more sessions", "target", g.name,
			"nodes", hint, "reached", distinct, "opening", len(added))
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

// The duplicate-node cause, for logging it once per run of them.
const causeDuplicate = "landed on a node this target already holds"

// runSlot connects s again and again until ctx ends (the client stops or
// the slot is retired).
func (g *targetGroup) runSlot(ctx context.Context, s *slot) {
	c := g.c
	failures := 0
	lastCause := ""
	for attempt := 0; ; attempt++ {
		g.mu.Lock()
		via := g.book.via(s)
		g.mu.Unlock()
		ws, ans, err := c.handshake(ctx, g.target, via)
		if err == nil {
			switch g.admit(s, via, ans) {
			case unwanted:
				ws.Close()
				return
			case duplicate:
				closeDuplicate(ws)
				c.metrics.DuplicateNode()
				failures++
				// Info once per run of duplicates, then debug.
				level := slog.LevelDebug
				if lastCause != causeDuplicate {
					level = slog.LevelInfo
					lastCause = causeDuplicate
				}
				c.log.Log(ctx, level, "session "+causeDuplicate+"; closed it, retrying with back-off",
					g.slotAttrs(s, via, "node", ans.node, "nodes", ans.nodes)...)
				g.failed(s, fmt.Sprintf("%s (%s); retrying", causeDuplicate, ans.node))
				if !sleep(ctx, backoff(failures)) {
					return
				}
				continue
			}
		}
		var sess *tunnel.Session
		if err == nil {
			if sess, err = tunnel.NewClientSession(ws, c.tunnel); err != nil {
				g.ended(s, err.Error())
			}
		}
		if attempt > 0 && ctx.Err() == nil {
			c.metrics.Reconnect(err == nil)
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			g.failed(s, err.Error())
			failures++
			// One line per distinct cause, not one per retry.
			if cause := err.Error(); cause != lastCause {
				msg := "cannot connect; retrying with back-off"
				if isCertError(err) {
					msg = "TLS certificate of the server not accepted; retrying with back-off"
				}
				c.log.Warn(msg, g.slotAttrs(s, via, "cause", cause)...)
				lastCause = cause
			}
			if !sleep(ctx, backoff(failures)) {
				return
			}
			continue
		}
		c.log.Info("connected", g.slotAttrs(s, via, "node", ans.node, "session", ans.session, "attempts", failures+1)...)
		connected := time.Now()
		lastCause = ""
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
		if !sleep(ctx, backoff(failures)) {
			return
		}
	}
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

// admit asks the book whether s keeps a session that landed on ans.node.
func (g *targetGroup) admit(s *slot, via string, ans answer) verdict {
	g.mu.Lock()
	v := g.book.admit(s, via, ans)
	g.mu.Unlock()
	if v == keep {
		g.poke()
	}
	return v
}

// ended records that s's session ended.
func (g *targetGroup) ended(s *slot, cause string) {
	g.mu.Lock()
	g.book.release(s, cause)
	g.mu.Unlock()
	g.poke()
	g.publish()
}

// failed records why s could not connect.
func (g *targetGroup) failed(s *slot, cause string) {
	g.mu.Lock()
	s.lastErr = cause
	g.mu.Unlock()
	g.publish()
}

// closeDuplicate ends a session the client does not keep, saying why, so
// the server's log shows it.
func closeDuplicate(ws *websocket.Conn) {
	msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "this client already holds a session to this node")
	ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
	ws.Close()
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
