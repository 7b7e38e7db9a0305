package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/gorilla/websocket"

	"wsp/internal/config"
	"wsp/internal/httperr"
	"wsp/internal/legacy"
	"wsp/internal/tunnel"
)

// The legacy protocol (legacy: true) is how this client serves a
// root-gg/wsp server: one WebSocket per request in flight, no multiplexing,
// bodies as whole messages (see package legacy). Like the original client it
// keeps, per target, poolidlesize connections waiting for a request, never
// more than poolmaxsize in all, checks that every second and opens a
// replacement as soon as a connection starts a request.
//
// Failures are answered with wsp's own statuses (403 client_refused, 502
// dial_failed, 504 destination_timeout...), X-Wsp-Error and the one-line
// body a v2 stream would carry, not with root-gg/wsp's catch-all 527: the
// old server relays any status and body to the app unchanged, so the app
// gets the precise cause, and one set of statuses is documented for both
// protocols.

const (
	// legacyCheck is how often the pool is topped up, as the original did.
	legacyCheck = time.Second
	// legacyWriteTimeout bounds sending one answer: a server that does not
	// take it in that time loses the connection.
	legacyWriteTimeout = time.Minute
)

// errStalled cancels a request whose destination made no progress within
// headertimeout.
var errStalled = errors.New("no progress within headertimeout")

// runLegacyTarget keeps a pool of legacy connections to one old server
// until ctx ends, then drains it. Every goroutine it started has ended when
// it returns.
// (An id with '_', which the greeting cannot carry, is refused by the
// configuration's Validate.)
func (c *Client) runLegacyTarget(ctx context.Context, target string) {
	newLegacyPool(c, target).run(ctx)
}

// legacyPool is one target's connections. The run loop opens them; each
// then lives in a goroutine of its own (connect) counted by conns.
type legacyPool struct {
	c      *Client
	target string
	dialer *websocket.Dialer
	// http executes the requests. Each pool has its own so that run can
	// close its idle connections once the last request is done.
	http *http.Client
	// abandon is the parent of every request's context; cancelled when the
	// drain time is up. Set before any connection starts.
	abandon context.Context
	// wake asks the run loop to check the pool now (capacity 1).
	wake  chan struct{}
	conns sync.WaitGroup // one count per connection goroutine

	mu        sync.Mutex
	open      map[*legacyConn]struct{} // guarded by mu: connections up, idle or busy
	busy      int                      // guarded by mu: open connections executing a request
	dialing   int                      // guarded by mu
	draining  bool                     // guarded by mu: open no more, close connections once idle
	failures  int                      // guarded by mu: failed dials in a row
	lastCause string                   // guarded by mu: the last failure logged, to log each cause once
	retryAt   time.Time                // guarded by mu: no dial before this (back-off)
	probes    int                      // guarded by mu: dials made while no connection was up
}

// legacyConn is one connection of a pool; ws is owned by its connect
// goroutine, which closes it.
type legacyConn struct {
	ws      *websocket.Conn
	busy    bool // guarded by the pool's mu
	closing bool // guarded by the pool's mu: the drain closed it while idle
}

func newLegacyPool(c *Client, target string) *legacyPool {
	d := tunnel.NewDialer(30 * time.Second)
	d.Subprotocols = nil // what an old server expects; a new one takes it as legacy
	d.TLSClientConfig = c.dialer.TLSClientConfig
	return &legacyPool{
		c:      c,
		target: target,
		dialer: d,
		http:   newLegacyHTTP(c.cfg),
		wake:   make(chan struct{}, 1),
		open:   map[*legacyConn]struct{}{},
	}
}

// newLegacyHTTP is the client requests run on: never following redirects
// (the app gets them, as with v2), no transparent gzip (bodies go out as
// the destination sent them), destinations dialed directly like the v2
// path does (proxy settings are for reaching the server).
func newLegacyHTTP(cfg config.Client) *http.Client {
	dialer := &net.Dialer{Timeout: cfg.DialTimeout.D(), KeepAlive: 30 * time.Second}
	return &http.Client{
		Transport: &http.Transport{
			DialContext:           dialer.DialContext,
			TLSHandshakeTimeout:   cfg.DialTimeout.D(),
			ResponseHeaderTimeout: cfg.HeaderTimeout.D(),
			DisableCompression:    true,
			MaxIdleConnsPerHost:   cfg.PoolMaxSize,
			IdleConnTimeout:       90 * time.Second,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// run tops the pool up every legacyCheck, and at once when a connection
// starts a request or a back-off ends, until ctx ends; then it drains.
func (p *legacyPool) run(ctx context.Context) {
	abandon, cancel := context.WithCancel(context.Background())
	defer cancel()
	p.abandon = abandon
	defer p.http.CloseIdleConnections() // after the drain: no request is left
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			p.drain(cancel)
			return
		case <-timer.C:
		case <-p.wake:
		}
		timer.Reset(p.fill(ctx))
	}
}

// poke asks the run loop to check the pool now.
func (p *legacyPool) poke() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// fill opens connections until poolidlesize are idle or on their way,
// within poolmaxsize in all, and says when to check again.
func (p *legacyPool) fill(ctx context.Context) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ctx.Err() != nil || p.draining {
		return legacyCheck
	}
	if wait := time.Until(p.retryAt); wait > 0 {
		return min(wait, legacyCheck)
	}
	probe := len(p.open) == 0
	n := legacyDials(p.c.cfg.PoolIdleSize, p.c.cfg.PoolMaxSize, len(p.open), p.busy, p.dialing)
	for range n {
		reconnect := false
		if probe {
			p.probes++
			reconnect = p.probes > 1
		}
		p.dialing++
		p.conns.Add(1)
		go p.connect(ctx, reconnect)
	}
	return legacyCheck
}

// legacyDials is how many connections to open now, with open connections
// up (busy of them executing a request) and dialing on their way: enough
// that idleSize are idle or coming, within maxSize in all.
func legacyDials(idleSize, maxSize, open, busy, dialing int) int {
	n := idleSize - (open - busy) - dialing
	if open == 0 {
		// Nothing up: one dial at a time finds out whether the server is
		// there (the original, too, opened one connection into an empty
		// pool), so an unreachable server costs one attempt per back-off.
		n = 1 - dialing
	}
	return max(0, min(n, maxSize-open-dialing))
}

// connect opens one connection and serves requests on it until it ends.
// reconnect marks a dial after the first into an empty pool, for metrics.
func (p *legacyPool) connect(ctx context.Context, reconnect bool) {
	defer p.conns.Done()
	ws, err := p.dial(ctx)
	if reconnect && ctx.Err() == nil {
		p.c.metrics.Reconnect(err == nil)
	}
	lc := p.opened(ctx, ws, err)
	if lc == nil {
		return
	}
	cause := p.serve(lc)
	ws.Close()
	p.closed(lc, cause)
}

// dial opens a WebSocket to the target and greets the server.
func (p *legacyPool) dial(ctx context.Context) (*websocket.Conn, error) {
	hdr := http.Header{}
	hdr.Set(tunnel.HeaderSecretKey, p.c.cfg.SecretKey) // sent even when empty, as the original does
	if p.c.cfg.Token != "" {
		hdr.Set("Authorization", "Bearer "+p.c.cfg.Token) // ignored by old servers
	}
	ws, resp, err := p.dialer.DialContext(ctx, wsURL(p.target), hdr)
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			return nil, refusal(resp)
		}
		return nil, err
	}
	ws.SetReadLimit(int64(p.c.cfg.MaxMessageBytes))
	ws.SetWriteDeadline(time.Now().Add(legacyWriteTimeout))
	if err := ws.WriteMessage(websocket.TextMessage, []byte(legacy.Greeting(p.c.cfg.ID, p.c.cfg.PoolIdleSize))); err != nil {
		ws.Close()
		return nil, fmt.Errorf("greeting: %w", err)
	}
	return ws, nil
}

// opened records the outcome of a dial: a failure sets the back-off and is
// logged once per distinct cause; a connection joins the pool, unless it
// drains. The first one up makes the target ready.
func (p *legacyPool) opened(ctx context.Context, ws *websocket.Conn, err error) *legacyConn {
	t := config.RedactURL(p.target)
	p.mu.Lock()
	p.dialing--
	if err != nil {
		if ctx.Err() != nil {
			p.mu.Unlock()
			return nil
		}
		p.failures++
		p.retryAt = time.Now().Add(backoff(p.failures))
		cause := err.Error()
		newCause := cause != p.lastCause
		p.lastCause = cause
		if len(p.open) == 0 {
			p.c.setTarget(p.target, targetState{Target: t, LastError: cause})
		}
		p.mu.Unlock()
		if newCause {
			msg := "cannot connect; retrying with back-off"
			if isCertError(err) {
				msg = "TLS certificate of the server not accepted; retrying with back-off"
			}
			p.c.log.Warn(msg, "target", t, "protocol", "legacy", "cause", cause)
		}
		p.poke() // the loop sleeps until the back-off ends
		return nil
	}
	if p.draining {
		p.mu.Unlock()
		ws.Close()
		return nil
	}
	lc := &legacyConn{ws: ws}
	p.open[lc] = struct{}{}
	first := len(p.open) == 1
	attempts := p.failures + 1
	p.failures, p.lastCause = 0, ""
	if first {
		// One session per target for readiness and metrics, however
		// many connections it takes.
		p.c.ready.Add(1)
		p.c.metrics.Session(1)
		p.c.setTarget(p.target, targetState{Target: t, Connected: true, Since: time.Now()})
	}
	p.mu.Unlock()
	if first {
		p.c.log.Info("connected", "target", t, "protocol", "legacy", "attempts", attempts)
	}
	return lc
}

// closed removes a connection that ended; the last one makes the target
// not ready and delays the next dial a little.
func (p *legacyPool) closed(lc *legacyConn, cause string) {
	p.mu.Lock()
	delete(p.open, lc)
	if lc.busy {
		p.busy--
	}
	last := len(p.open) == 0
	draining := p.draining
	if last {
		p.c.ready.Add(-1)
		p.c.metrics.Session(-1)
		p.c.setTarget(p.target, targetState{Target: config.RedactURL(p.target), LastError: cause})
		if !draining {
			p.retryAt = time.Now().Add(backoff(1))
		}
	}
	p.mu.Unlock()
	switch {
	case last && draining:
		p.c.log.Info("disconnected", "target", config.RedactURL(p.target), "protocol", "legacy", "cause", cause)
	case last:
		p.c.log.Warn("disconnected; reconnecting", "target", config.RedactURL(p.target), "protocol", "legacy", "cause", cause)
		p.poke()
	default:
		// The pool refills on its next check, not at once: a server that
		// drops connections as fast as they come costs one round a second.
		p.c.log.Debug("legacy connection ended", "target", config.RedactURL(p.target), "cause", cause)
	}
}

// begin marks lc busy and has the pool open a replacement; false when
// draining (the connection is being closed: the request cannot be answered).
func (p *legacyPool) begin(lc *legacyConn) bool {
	p.mu.Lock()
	if p.draining {
		p.mu.Unlock()
		return false
	}
	lc.busy = true
	p.busy++
	p.mu.Unlock()
	p.poke()
	return true
}

// end marks lc idle again; false when draining (it is to close instead).
func (p *legacyPool) end(lc *legacyConn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	lc.busy = false
	p.busy--
	return !p.draining
}

// isClosing reports whether the drain closed lc.
func (p *legacyPool) isClosing(lc *legacyConn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return lc.closing
}

// drain stops dialing, closes the idle connections, lets busy ones finish
// their request for up to the drain time, then abandons the rest. It
// returns when every connection goroutine has.
func (p *legacyPool) drain(abandon context.CancelFunc) {
	p.mu.Lock()
	p.draining = true
	var idle []*websocket.Conn
	for lc := range p.open {
		if !lc.busy {
			lc.closing = true
			idle = append(idle, lc.ws)
		}
	}
	p.mu.Unlock()
	// The protocol has no way to say "no more requests": an idle
	// connection closed now is one the server stops choosing.
	for _, ws := range idle {
		ws.Close()
	}
	done := make(chan struct{})
	go func() {
		p.conns.Wait()
		close(done)
	}()
	timer := time.NewTimer(p.c.cfg.Drain.D())
	defer timer.Stop()
	select {
	case <-done:
		return
	case <-timer.C:
	}
	p.mu.Lock()
	rest := make([]*websocket.Conn, 0, len(p.open))
	for lc := range p.open {
		rest = append(rest, lc.ws)
	}
	p.mu.Unlock()
	p.c.log.Warn("drain timed out; abandoning requests", "target", config.RedactURL(p.target), "protocol", "legacy", "in_flight", len(rest))
	abandon()
	for _, ws := range rest {
		ws.Close()
	}
	<-done
}

// serve answers requests on lc one after another until the connection
// ends, and says why it ended.
func (p *legacyPool) serve(lc *legacyConn) string {
	ws := lc.ws
	// Ping as the original did, and take a server silent for two
	// intervals (no request, no pong) for gone: a half-open connection
	// must not keep the pool looking full.
	keepAlive := p.c.cfg.KeepAlive.D()
	ws.SetPongHandler(func(string) error { return ws.SetReadDeadline(time.Now().Add(2 * keepAlive)) })
	stop := make(chan struct{})
	var pinger sync.WaitGroup
	pinger.Go(func() { ping(ws, keepAlive, stop) })
	defer func() {
		close(stop)
		pinger.Wait()
	}()
	for {
		ws.SetReadDeadline(time.Now().Add(2 * keepAlive))
		typ, msg, err := ws.ReadMessage()
		if err != nil {
			return p.readFailed(lc, err)
		}
		if typ != websocket.TextMessage {
			return p.violation(ws, fmt.Errorf("%w: binary message where a request head is due", legacy.ErrProtocol))
		}
		head, err := legacy.DecodeRequestHead(msg)
		if err != nil {
			return p.violation(ws, err)
		}
		if !p.begin(lc) {
			return "client shutting down"
		}
		// The body follows at once; pongs keep extending the deadline
		// while a large one arrives.
		ws.SetReadDeadline(time.Now().Add(2 * keepAlive))
		typ, body, err := ws.ReadMessage()
		if err != nil {
			return p.readFailed(lc, err)
		}
		if typ != websocket.BinaryMessage {
			return p.violation(ws, fmt.Errorf("%w: text message where a request body is due", legacy.ErrProtocol))
		}
		answer, answerBody := p.execute(head, body)
		if err := writeAnswer(ws, answer, answerBody); err != nil {
			return "answer not sent: " + err.Error()
		}
		if !p.end(lc) {
			return "client shutting down"
		}
	}
}

// ping sends a ping every interval until stop is closed or a ping fails.
func ping(ws *websocket.Conn, every time.Duration, stop <-chan struct{}) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			if ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(every)) != nil {
				return
			}
		}
	}
}

// readFailed says why a read ended the connection, logging protocol
// violations.
func (p *legacyPool) readFailed(lc *legacyConn, err error) string {
	var ce *websocket.CloseError
	var ne net.Error
	switch {
	case p.isClosing(lc):
		return "client shutting down"
	case errors.Is(err, websocket.ErrReadLimit):
		// The WebSocket library has already sent close code 1009.
		return p.violation(lc.ws, fmt.Errorf("%w: message larger than maxmessagebytes (%d bytes)", legacy.ErrProtocol, p.c.cfg.MaxMessageBytes))
	case errors.As(err, &ce):
		return "closed by the server: " + err.Error()
	case errors.As(err, &ne) && ne.Timeout():
		return "server silent for two keepalive intervals"
	}
	return "connection lost: " + err.Error()
}

// violation logs a server's breach of the protocol and tells the server
// why this connection ends; the others are not affected.
func (p *legacyPool) violation(ws *websocket.Conn, err error) string {
	p.c.log.Warn("server broke the legacy protocol; closing this connection", "target", config.RedactURL(p.target), "cause", err)
	ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseProtocolError, ""), time.Now().Add(time.Second))
	return err.Error()
}

// execute runs one request and returns the answer to send, counted in the
// metrics. Failures are answered too: the server always gets an answer.
func (p *legacyPool) execute(head legacy.RequestHead, body []byte) (legacy.ResponseHead, []byte) {
	c := p.c
	c.metrics.InFlight(1)
	defer c.metrics.InFlight(-1)
	answer, answerBody, e := p.roundTrip(head, body)
	if e != nil {
		c.metrics.Request("http", e.Status)
		msg := "request failed"
		if e.Code == httperr.ClientRefused || e.Status == http.StatusBadRequest {
			msg = "request refused"
		}
		c.log.Info(msg, "method", head.Method, "url", legacyRedact(head.URL), "status", e.Status, "cause", e.Error())
		return errorAnswer(e)
	}
	c.metrics.Request("http", answer.StatusCode)
	return answer, answerBody
}

// roundTrip checks the request against the rules, executes it and reads
// the whole answer. Each step is bounded: dialtimeout to connect, then
// headertimeout for the answer's head and again between any two reads of
// its body, which may not exceed maxmessagebytes. The protocol has no way
// to cancel, so these bounds are all that free the connection.
func (p *legacyPool) roundTrip(h legacy.RequestHead, body []byte) (legacy.ResponseHead, []byte, *httperr.Error) {
	cfg := &p.c.cfg
	if h.Method == http.MethodConnect {
		return legacy.ResponseHead{}, nil, httperr.New(http.StatusBadRequest, httperr.BadRequest, "client %q: CONNECT cannot be relayed over the legacy protocol", cfg.ID)
	}
	ctx, cancel := context.WithCancelCause(p.abandon)
	defer cancel(nil)
	req, err := http.NewRequestWithContext(ctx, h.Method, h.URL, bytes.NewReader(body))
	if err != nil {
		return legacy.ResponseHead{}, nil, httperr.Wrap(err, http.StatusBadRequest, httperr.BadDestination, "client %q: unusable request %s %s", cfg.ID, h.Method, legacyRedact(h.URL))
	}
	if h.Header != nil {
		req.Header = h.Header
	}
	if e := p.c.admit(req); e != nil {
		return legacy.ResponseHead{}, nil, e
	}
	// A connection carries one request and one whole answer, never a
	// byte stream: no upgrades.
	req.Header.Del("Connection")
	req.Header.Del("Upgrade")

	var watchdog *time.Timer
	stall := cfg.HeaderTimeout.D()
	if stall > 0 {
		watchdog = time.AfterFunc(cfg.DialTimeout.D()+stall, func() { cancel(errStalled) })
		defer watchdog.Stop()
	}
	resp, err := p.http.Do(req)
	if err != nil {
		return legacy.ResponseHead{}, nil, legacyError(ctx, cfg.ID, req.URL.Host, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusSwitchingProtocols {
		return legacy.ResponseHead{}, nil, httperr.New(http.StatusBadGateway, httperr.DestinationBroken, "client %q: %s switched protocols, which the legacy protocol cannot carry", cfg.ID, req.URL.Host)
	}
	limit := int64(cfg.MaxMessageBytes)
	b, err := io.ReadAll(io.LimitReader(progressReader{resp.Body, watchdog, stall}, limit+1))
	if err != nil {
		return legacy.ResponseHead{}, nil, legacyError(ctx, cfg.ID, req.URL.Host, err)
	}
	if int64(len(b)) > limit {
		// Sending the first maxmessagebytes would pass a truncated body
		// off as whole.
		return legacy.ResponseHead{}, nil, httperr.New(http.StatusBadGateway, httperr.DestinationBroken, "client %q: the answer of %s exceeds maxmessagebytes (%d bytes), the largest body the legacy protocol carries", cfg.ID, req.URL.Host, limit)
	}
	removeHopHeaders(resp.Header)
	answer := legacy.ResponseHead{StatusCode: resp.StatusCode, Header: resp.Header, ContentLength: int64(len(b))}
	if req.Method == http.MethodHead {
		answer.ContentLength = resp.ContentLength // what a GET would bring
	}
	return answer, b, nil
}

// legacyError maps a failed exchange with the destination to what the app
// is told, as the v2 path does.
func legacyError(ctx context.Context, id, host string, err error) *httperr.Error {
	if context.Cause(ctx) == errStalled {
		return httperr.Wrap(errStalled, http.StatusGatewayTimeout, httperr.DestinationTimeout, "client %q: %s did not answer in time", id, host)
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return dialError(id, host, err)
	}
	return destinationError(id, host, err)
}

// progressReader pushes the watchdog back on every read that brings bytes.
type progressReader struct {
	r        io.Reader
	watchdog *time.Timer // nil: no bound
	d        time.Duration
}

func (pr progressReader) Read(b []byte) (int, error) {
	n, err := pr.r.Read(b)
	if n > 0 && pr.watchdog != nil {
		pr.watchdog.Reset(pr.d)
	}
	return n, err
}

// errorAnswer is e exactly as a v2 stream carries it (status, X-Wsp-Error,
// one-line body): httperr.WriteResponse is the one place that says how,
// so its output is parsed back rather than rebuilt here.
func errorAnswer(e *httperr.Error) (legacy.ResponseHead, []byte) {
	var buf bytes.Buffer
	httperr.WriteResponse(&buf, e) // a bytes.Buffer does not fail
	resp, err := http.ReadResponse(bufio.NewReader(&buf), nil)
	if err != nil { // cannot happen: what net/http wrote, it reads
		return legacy.ResponseHead{StatusCode: e.Status, Header: http.Header{httperr.Header: {e.Code}}}, nil
	}
	b, _ := io.ReadAll(resp.Body)
	removeHopHeaders(resp.Header)
	return legacy.ResponseHead{StatusCode: resp.StatusCode, Header: resp.Header, ContentLength: int64(len(b))}, b
}

// writeAnswer sends an answer: the JSON head as text, the body as binary.
func writeAnswer(ws *websocket.Conn, head legacy.ResponseHead, body []byte) error {
	if head.Header == nil {
		head.Header = http.Header{}
	}
	b, err := json.Marshal(head)
	if err != nil {
		return err
	}
	ws.SetWriteDeadline(time.Now().Add(legacyWriteTimeout))
	if err := ws.WriteMessage(websocket.TextMessage, b); err != nil {
		return err
	}
	return ws.WriteMessage(websocket.BinaryMessage, body)
}

// legacyRedact is a request URL for logs: no user info, no query.
func legacyRedact(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL)"
	}
	return redact(u)
}
