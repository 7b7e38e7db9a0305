// Package client is wsp's private side: it dials out to servers, keeps a
// session to each, and executes the requests relayed through them.
package client

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"wsp/internal/config"
	"wsp/internal/httperr"
	"wsp/internal/metrics"
	"wsp/internal/rules"
	"wsp/internal/tunnel"
)

// Version is reported to servers in the handshake; cmd/wsp sets it.
var Version = "dev"

// Reconnect back-off: exponential from backoffBase, capped, with full
// jitter so a fleet that lost its server does not return in lockstep.
const (
	backoffBase = 250 * time.Millisecond
	backoffCap  = 30 * time.Second
	// stableSession is how long a session must last for the back-off to
	// start again from the bottom.
	stableSession = 10 * time.Second
	// drainPoll is how often a drain checks whether in-flight requests
	// are done.
	drainPoll = 20 * time.Millisecond
)

// Client keeps sessions to its targets and serves their streams.
type Client struct {
	cfg      config.Client
	log      *slog.Logger
	rules    *rules.Set
	tunnel   tunnel.Config
	backends *backendPool
	dialer   *websocket.Dialer

	ready   atomic.Int32 // sessions up
	metrics *metrics.Client

	mu      sync.Mutex
	targets map[string]targetState // guarded by mu: each target's state, for /api/stats
}

// New checks cfg and returns a Client ready to Run.
func New(cfg config.Client, log *slog.Logger) (*Client, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	rs, err := rules.NewSet(cfg.Whitelist, cfg.Blacklist)
	if err != nil {
		return nil, err
	}
	tc := tunnel.DefaultConfig()
	tc.KeepAlive = cfg.KeepAlive.D()
	if err := tc.Validate(); err != nil {
		return nil, fmt.Errorf("tunnel settings: %w", err)
	}
	dialer := tunnel.NewDialer(30 * time.Second)
	if dialer.TLSClientConfig, err = tlsConfig(cfg.TLS); err != nil {
		return nil, err
	}
	return &Client{
		cfg:    cfg,
		log:    log,
		rules:  rs,
		tunnel: tc,
		// Keep as many idle connections per destination as can be busy at
		// once: fewer, and a burst ends in a storm of fresh dials.
		backends: newBackendPool(cfg.DialTimeout.D(), cfg.PoolMaxSize*len(cfg.Targets)),
		dialer:   dialer,
		metrics:  metrics.NewClient(),
		targets:  map[string]targetState{},
	}, nil
}

// tlsConfig is how the client verifies wss:// servers and proves itself.
func tlsConfig(t config.ClientTLS) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: t.InsecureSkipVerify}
	if t.CA != "" {
		pool, err := config.LoadCertPool(t.CA)
		if err != nil {
			return nil, fmt.Errorf("tls.ca: %w", err)
		}
		cfg.RootCAs = pool
	}
	if t.Cert != "" {
		cert, err := tls.LoadX509KeyPair(t.Cert, t.Key)
		if err != nil {
			return nil, fmt.Errorf("tls.cert: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// Ready reports whether at least one session is up.
func (c *Client) Ready() bool { return c.ready.Load() > 0 }

// Run keeps a session to every target until ctx ends, then drains: the
// server is told to send no more requests, in-flight ones finish for up to
// the drain time, and Run returns.
func (c *Client) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	for _, target := range c.cfg.Targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if c.cfg.Legacy {
				c.runLegacyTarget(ctx, target)
				return
			}
			c.runTarget(ctx, target)
		}()
	}
	wg.Wait()
	c.backends.close()
	return nil
}

// runTarget connects to one server again and again until ctx ends.
func (c *Client) runTarget(ctx context.Context, target string) {
	failures := 0
	lastCause := ""
	for attempt := 0; ; attempt++ {
		sess, sid, err := c.dial(ctx, target)
		if attempt > 0 && ctx.Err() == nil {
			c.metrics.Reconnect(err == nil)
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			c.setTarget(target, targetState{Target: redactURL(target), LastError: err.Error()})
			failures++
			// One line per distinct cause, not one per retry.
			if cause := err.Error(); cause != lastCause {
				msg := "cannot connect; retrying with back-off"
				if isCertError(err) {
					msg = "TLS certificate of the server not accepted; retrying with back-off"
				}
				c.log.Warn(msg, "target", redactURL(target), "cause", cause)
				lastCause = cause
			}
			if !sleep(ctx, backoff(failures)) {
				return
			}
			continue
		}
		c.log.Info("connected", "target", redactURL(target), "session", sid, "attempts", failures+1)
		connected := time.Now()
		lastCause = ""
		c.ready.Add(1)
		c.metrics.Session(1)
		c.setTarget(target, targetState{Target: redactURL(target), Connected: true, Session: sid, Since: time.Now()})
		cause := c.serve(ctx, sess)
		c.setTarget(target, targetState{Target: redactURL(target), LastError: cause})
		c.metrics.Session(-1)
		c.ready.Add(-1)
		if ctx.Err() != nil {
			c.log.Info("disconnected", "target", redactURL(target), "session", sid, "cause", cause)
			return
		}
		c.log.Warn("disconnected; reconnecting", "target", redactURL(target), "session", sid, "cause", cause)
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

// isCertError reports whether err is the server's certificate failing
// verification.
func isCertError(err error) bool {
	var unknown x509.UnknownAuthorityError
	var invalid x509.CertificateInvalidError
	var host x509.HostnameError
	var verify *tls.CertificateVerificationError
	return errors.As(err, &unknown) || errors.As(err, &invalid) || errors.As(err, &host) || errors.As(err, &verify)
}

// redactURL drops user info from a target for logs.
func redactURL(target string) string {
	u, err := url.Parse(target)
	if err != nil {
		return "(unparsable target)"
	}
	return u.Redacted()
}

// backoff is the wait before attempt n+1 after n failures.
func backoff(n int) time.Duration {
	ceil := backoffCap
	if n < 20 {
		ceil = min(backoffCap, backoffBase<<n)
	}
	return rand.N(ceil) + time.Millisecond
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// dial opens a session to target.
func (c *Client) dial(ctx context.Context, target string) (*tunnel.Session, string, error) {
	hello := tunnel.Hello{
		ClientID:   c.cfg.ID,
		SecretKey:  c.cfg.SecretKey,
		Token:      c.cfg.Token,
		MaxStreams: c.cfg.PoolMaxSize,
		Version:    Version,
		Rules:      tunnel.Rules{Whitelist: c.cfg.Whitelist, Blacklist: c.cfg.Blacklist},
	}
	// gorilla bounds its handshake by HandshakeTimeout only: cancelling
	// ctx (shutting down) must end a handshake to a silent server too.
	d := *c.dialer
	var mu sync.Mutex
	var conn net.Conn
	d.NetDialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		var nd net.Dialer
		cn, err := nd.DialContext(ctx, network, addr)
		mu.Lock()
		conn = cn
		mu.Unlock()
		if cn != nil && ctx.Err() != nil {
			cn.SetDeadline(time.Now()) // cancelled before conn was set
		}
		return cn, err
	}
	stop := context.AfterFunc(ctx, func() {
		mu.Lock()
		defer mu.Unlock()
		if conn != nil {
			conn.SetDeadline(time.Now())
		}
	})
	ws, resp, err := d.DialContext(ctx, wsURL(target), hello.Header())
	stop()
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			return nil, "", refusal(resp)
		}
		return nil, "", err
	}
	if ws.Subprotocol() != tunnel.Subprotocol {
		ws.Close()
		return nil, "", fmt.Errorf("server did not accept subprotocol %s: is it a root-gg/wsp server?", tunnel.Subprotocol)
	}
	sess, err := tunnel.NewClientSession(ws, c.tunnel)
	if err != nil {
		return nil, "", err
	}
	return sess, resp.Header.Get(tunnel.HeaderSession), nil
}

// wsURL accepts http(s) targets as the ws(s) URLs they stand for.
func wsURL(target string) string {
	switch {
	case strings.HasPrefix(target, "http://"):
		return "ws://" + strings.TrimPrefix(target, "http://")
	case strings.HasPrefix(target, "https://"):
		return "wss://" + strings.TrimPrefix(target, "https://")
	}
	return target
}

// refusal turns a server's non-101 answer into an error saying why.
func refusal(resp *http.Response) error {
	msg := ""
	if resp.Body != nil {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		msg = strings.TrimSpace(string(b))
	}
	return fmt.Errorf("server refused registration: %s: %s", resp.Status, msg)
}

// serve accepts streams on sess until it ends or ctx does, and says why it
// ended. Every stream handler has returned when serve does.
func (c *Client) serve(ctx context.Context, sess *tunnel.Session) string {
	var handlers sync.WaitGroup
	streams := newStreamSet()
	var open atomic.Int64
	accepted := make(chan error, 1)
	// The accept loop holds one count itself, so Add never races Wait from
	// zero.
	handlers.Add(1)
	go func() {
		defer handlers.Done()
		for {
			st, err := sess.AcceptStream()
			if err != nil {
				accepted <- err
				return
			}
			handlers.Add(1)
			n := open.Add(1)
			go func() {
				defer handlers.Done()
				defer open.Add(-1)
				if n > 2*int64(c.cfg.PoolMaxSize) {
					// The server keeps within the limit it was told in the
					// hello, but frees a slot as soon as it has the whole
					// answer, a moment before this side's handler is done:
					// hence the slack. A server that ignores the limit gets
					// refusals, not unbounded work.
					c.refuse(st, httperr.New(http.StatusServiceUnavailable, httperr.ClientBusy, "client %q is at its limit of %d concurrent requests", c.cfg.ID, c.cfg.PoolMaxSize))
					return
				}
				streams.add(st)
				defer streams.remove(st)
				c.handle(st, streams)
			}()
		}
	}()

	var cause string
	select {
	case <-sess.CloseChan():
		cause = "connection lost"
		if err := sess.Err(); err != nil {
			cause += ": " + err.Error()
		}
	case <-ctx.Done():
		cause = "client shutting down"
		sess.GoAway()   // the server opens no more streams...
		streams.drain() // ...nor reuses the idle ones
		deadline := time.Now().Add(c.cfg.Drain.D())
		for streams.inflight() > 0 && time.Now().Before(deadline) && !sess.IsClosed() {
			time.Sleep(drainPoll)
		}
		if n := streams.inflight(); n > 0 {
			c.log.Warn("drain timed out; abandoning requests", "in_flight", n)
		}
	}
	streams.stopReading()
	sess.Close()
	<-accepted
	handlers.Wait()
	return cause
}
