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
	// pongWait bounds the wait for the drain's pings with drain 0.
	pongWait = time.Second
)

// Client keeps sessions to its targets and serves their streams.
type Client struct {
	// Resolver looks up the addresses of targets' host names (discovery);
	// nil means net.DefaultResolver. Set it before Run.
	Resolver Resolver

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
	c := &Client{
		cfg:     cfg,
		log:     log,
		rules:   rs,
		tunnel:  tc,
		dialer:  dialer,
		metrics: metrics.NewClient(),
		targets: map[string]targetState{},
	}
	// Keep as many idle connections per destination as can be busy at
	// once: fewer, and a burst ends in a storm of fresh dials. Each session
	// (a legacy target's connections count as one) carries up to
	// poolmaxsize requests, and with discovery or a node count a target
	// holds several sessions, a number known only as they come up: the
	// bound follows the sessions up, and never falls below one per target.
	c.backends = newBackendPool(cfg.DialTimeout.D(), func() int {
		return cfg.PoolMaxSize * max(len(cfg.Targets), int(c.ready.Load()))
	})
	return c, nil
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
// the drain time, and Run returns. With discovery, a target whose host is a
// name gets a session to every address it resolves to (discovery.go).
func (c *Client) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	if c.cfg.Legacy {
		for _, target := range c.cfg.Targets {
			wg.Go(func() { c.runLegacyTarget(ctx, target) })
		}
	} else {
		groups := make([]*targetGroup, 0, len(c.cfg.Targets))
		for _, target := range c.cfg.Targets {
			g, err := newTargetGroup(c, target)
			if err != nil {
				return err
			}
			groups = append(groups, g)
		}
		for _, g := range groups {
			wg.Go(func() { g.run(ctx) })
		}
	}
	wg.Wait()
	c.backends.close()
	return nil
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

// backoff is the wait before attempt n+1 after n failures.
func backoff(n int) time.Duration {
	ceil := backoffCap
	if n < 20 {
		ceil = min(backoffCap, backoffBase<<n)
	}
	return rand.N(ceil) + time.Millisecond
}

func sleep(ctx context.Context, d time.Duration) bool {
	return sleepUnless(ctx, d, nil)
}

// sleepUnless is sleep cut short when early is closed (nil: never).
func sleepUnless(ctx context.Context, d time.Duration, early <-chan struct{}) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-early:
		return true
	case <-ctx.Done():
		return false
	}
}

// handshake opens a WebSocket to target, through addr when it is not ""
// (an address the target's host name resolved to: the connection goes
// there, while TLS verifies the name and the Host header carries it), and
// returns it with what the server's 101 said.
func (c *Client) handshake(ctx context.Context, target, addr string) (*websocket.Conn, answer, error) {
	hello := tunnel.Hello{
		ClientID:   c.cfg.ID,
		SecretKey:  c.cfg.SecretKey,
		Token:      c.cfg.Token,
		MaxStreams: c.cfg.PoolMaxSize,
		Version:    Version,
		Rules:      tunnel.Rules{Whitelist: c.cfg.Whitelist, Blacklist: c.cfg.Blacklist},
	}
	header := hello.Header()
	d := *c.dialer
	dialURL := wsURL(target)
	if addr != "" {
		var err error
		if dialURL, err = throughAddr(&d, header, dialURL, addr); err != nil {
			return nil, answer{}, err
		}
	}
	// gorilla bounds its handshake by HandshakeTimeout only: cancelling
	// ctx (shutting down) must end a handshake to a silent server too.
	var mu sync.Mutex
	var conn net.Conn
	d.NetDialContext = func(ctx context.Context, network, hostPort string) (net.Conn, error) {
		var nd net.Dialer
		cn, err := nd.DialContext(ctx, network, hostPort)
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
	ws, resp, err := d.DialContext(ctx, dialURL, header)
	stop()
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			return nil, answer{}, refusal(resp)
		}
		return nil, answer{}, err
	}
	if ws.Subprotocol() != tunnel.Subprotocol {
		ws.Close()
		return nil, answer{}, fmt.Errorf("server did not accept subprotocol %s: is it a root-gg/wsp server?", tunnel.Subprotocol)
	}
	return ws, parseAnswer(resp.Header), nil
}

// throughAddr points dialer d and the upgrade's header at addr instead of
// the host of rawURL, keeping the host name where it matters: in the Host
// header, as the TLS server name, and for the choice of a proxy (NO_PROXY
// names the host, not its addresses). It returns the URL to dial.
func throughAddr(d *websocket.Dialer, header http.Header, rawURL, addr string) (string, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return "", err
	}
	host, port := u.Hostname(), u.Port()
	if port == "" {
		port = "80"
		if u.Scheme == "wss" {
			port = "443"
		}
	}
	header.Set("Host", u.Host)
	if u.Scheme == "wss" {
		tc := d.TLSClientConfig.Clone()
		if tc == nil {
			tc = &tls.Config{MinVersion: tls.VersionTLS12}
		}
		if tc.ServerName == "" {
			tc.ServerName = host
		}
		d.TLSClientConfig = tc
	}
	if proxy := d.Proxy; proxy != nil {
		named := u.Host
		d.Proxy = func(r *http.Request) (*url.URL, error) {
			r2 := *r
			u2 := *r.URL
			u2.Host = named
			r2.URL = &u2
			return proxy(&r2)
		}
	}
	u.Host = net.JoinHostPort(addr, port)
	return u.String(), nil
}

// roundTrip pings the server and waits for the answer until by, or the
// session's end. The returned function waits for the ping to return, which
// it does at the latest when the session closes.
func roundTrip(sess *tunnel.Session, by time.Time) (wait func()) {
	pong := make(chan struct{})
	go func() {
		defer close(pong)
		sess.Ping()
	}()
	t := time.NewTimer(time.Until(by))
	defer t.Stop()
	select {
	case <-pong:
	case <-t.C:
	case <-sess.CloseChan():
	}
	return func() { <-pong }
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
			if n > 2*int64(c.cfg.PoolMaxSize) {
				// The server keeps within the limit it was told in the
				// hello, but frees a slot as soon as it has the whole
				// answer, a moment before this side's handler is done:
				// hence the slack. A server that ignores the limit gets
				// refusals, not unbounded work.
				go func() {
					defer handlers.Done()
					defer open.Add(-1)
					c.refuse(st, httperr.New(http.StatusServiceUnavailable, httperr.ClientBusy, "client %q is at its limit of %d concurrent requests", c.cfg.ID, c.cfg.PoolMaxSize))
				}()
				continue
			}
			// Tracked here rather than in the handler, so that a drain
			// never misses a stream accepted before it looked.
			streams.add(st)
			go func() {
				defer handlers.Done()
				defer open.Add(-1)
				defer streams.remove(st)
				c.handle(st, streams)
			}()
		}
	}()

	var cause string
	var pings []func() // wait for the drain's pings
	select {
	case <-sess.CloseChan():
		cause = "connection lost"
		if err := sess.Err(); err != nil {
			cause += ": " + err.Error()
		}
	case <-ctx.Done():
		cause = "client shutting down"
		var r retired
		if errors.As(context.Cause(ctx), &r) {
			cause = r.Error() // this session alone drains
		}
		// A round trip before the GoAway: yamux refuses (resets) the
		// streams that arrive after it, so everything the server sent
		// until it saw the ping is let in first; the requests a server
		// sends on a session it just registered, before the client
		// dismisses it, are served. A round trip after: the server has
		// seen the GoAway, and the streams it opened before are counted
		// in flight. Together they wait at most drain (a second with
		// drain 0).
		settle := time.Now().Add(max(c.cfg.Drain.D(), pongWait))
		pings = append(pings, roundTrip(sess, settle))
		sess.GoAway()   // the server opens no more streams...
		streams.drain() // ...nor reuses the idle ones
		pings = append(pings, roundTrip(sess, settle))
		deadline := time.Now().Add(c.cfg.Drain.D())
		for streams.inflight() > 0 && time.Now().Before(deadline) && !sess.IsClosed() {
			time.Sleep(drainPoll)
		}
		if n := streams.inflight(); n > 0 {
			c.log.Warn("drain timed out; abandoning requests", "in_flight", n)
		}
	}
	streams.stopReading()
	if ctx.Err() != nil {
		sess.CloseWithReason(cause) // the server's log says why
	} else {
		sess.Close()
	}
	for _, wait := range pings {
		wait() // the session's close ends a ping still out
	}
	<-accepted
	handlers.Wait()
	return cause
}
