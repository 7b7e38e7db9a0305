// Package server is wsp's public side: it accepts client sessions on
// /register and relays app requests through them.
package server

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"regexp"
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

// Server relays app requests to registered clients. Create it with New and
// run it with Serve.
type Server struct {
	cfg       config.Server
	node      string // this node's name (cluster.node or a generated one)
	log       *slog.Logger
	rules     *rules.Set
	tunnel    tunnel.Config
	routes    []route
	reg       *registry
	proxy     *httputil.ReverseProxy
	transport *transport
	upgrader  *websocket.Upgrader

	draining atomic.Bool    // set when Serve's context ends: /readyz fails, /register refuses
	closing  chan struct{}  // closed when the drain is over: sessions end
	reaped   chan struct{}  // closed when the reaper has ended every session
	chores   sync.WaitGroup // keepalive pings and idle-stream sweeps under way (tend)
	sessions sync.WaitGroup
	tunnels  sync.WaitGroup // CONNECT tunnels and forwarded upgrades: hijacked, so http.Server does not wait for them
	// life ends when the sessions do (closeSessions): connections to
	// other nodes, which no session's end would close, close with it.
	life    context.Context
	endLife context.CancelFunc
	certs   *certStore   // nil without TLS
	cluster *clusterNode // nil without cluster.redis
	stopMu  sync.Mutex
	stopped bool // guarded by stopMu: sessions and tunnels are no longer counted in

	metrics *metrics.Server
	started time.Time
	totals  totals
	errors  recentErrors
}

// New checks cfg and returns a Server ready to Serve.
func New(cfg config.Server, log *slog.Logger) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	rs, err := rules.NewSet(cfg.Whitelist, cfg.Blacklist)
	if err != nil {
		return nil, err
	}
	tc := tunnel.DefaultConfig()
	tc.KeepAlive = cfg.KeepAlive.D()
	tc.OwnerPings = true // the reaper pings every session
	if err := tc.Validate(); err != nil {
		return nil, fmt.Errorf("tunnel settings: %w", err)
	}
	s := &Server{
		cfg:      cfg,
		node:     cmp.Or(cfg.Cluster.Node, defaultNodeName()),
		log:      log,
		rules:    rs,
		tunnel:   tc,
		reg:      newRegistry(),
		metrics:  metrics.NewServer(),
		started:  time.Now(),
		upgrader: tunnel.NewUpgrader(cfg.HandshakeTimeout.D()),
		closing:  make(chan struct{}),
		reaped:   make(chan struct{}),
	}
	s.life, s.endLife = context.WithCancel(context.Background())
	if cfg.TLS.Enabled() {
		if s.certs, err = newCertStore(cfg.TLS); err != nil {
			return nil, err
		}
	}
	for _, r := range cfg.Routes {
		s.routes = append(s.routes, route{host: regexp.MustCompile(r.Host), client: r.Client}) // Validate compiled it
	}
	s.transport = &transport{metrics: s.metrics, reg: s.reg, timeout: cfg.Timeout.D()}
	s.proxy = s.newProxy()
	if cfg.Cluster.Enabled() {
		if s.cluster, err = s.newCluster(); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// defaultNodeName names a node that was not given a name: its host name and
// a random suffix, so two nodes on one host, or one node restarted, differ.
func defaultNodeName() string {
	host, err := os.Hostname()
	if err != nil || !tunnel.ValidID(host) || len(host) > 100 {
		host = "node"
	}
	return fmt.Sprintf("%s-%06x", host, rand.Uint32()&0xffffff)
}

// Node returns this node's name.
func (s *Server) Node() string { return s.node }

// route sends requests for matching hosts to one client pool.
type route struct {
	host   *regexp.Regexp
	client string
}

// Serve answers on ln until ctx ends, then drains: it stops accepting, lets
// in-flight requests finish for up to the configured drain time, closes the
// client sessions and returns. It closes ln.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	if s.certs != nil {
		ln = tls.NewListener(ln, s.certs.config())
	}
	if !s.cfg.Auth.Enabled() && !isLoopback(ln.Addr()) {
		s.log.Warn("open relay: no auth is configured, so anyone who can reach this address can send requests into the clients' networks; set auth", "addr", ln.Addr().String())
	}
	hs := &http.Server{
		Handler: s,
		// A peer trickling its request head (slowloris), on /register as
		// on app requests, is cut off.
		ReadHeaderTimeout: s.cfg.HandshakeTimeout.D(),
		MaxHeaderBytes:    s.cfg.MaxHeaderBytes,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	s.startCluster()
	defer s.closeCluster()
	go s.reap()
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case err := <-errc:
		s.closeSessions()
		return fmt.Errorf("serve %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}

	s.draining.Store(true)
	s.drainCluster() // other nodes stop sending here first, when they can
	if notice := s.cfg.DrainNotice.D(); notice > 0 {
		// Serve on, failing /readyz, until load balancers have noticed.
		s.log.Info("drain notice: /readyz fails, still serving", "for", notice)
		t := time.NewTimer(notice)
		select {
		case <-t.C:
		case err := <-errc:
			t.Stop()
			s.closeSessions()
			return fmt.Errorf("serve %s: %w", ln.Addr(), err)
		}
	}
	s.log.Info("draining", "timeout", s.cfg.Drain.D())
	dctx, cancel := context.WithTimeout(context.Background(), s.cfg.Drain.D())
	defer cancel()
	err := hs.Shutdown(dctx)
	if err == nil {
		err = waitCtx(dctx, &s.tunnels)
	}
	if err != nil {
		s.log.Warn("drain timed out; closing in-flight requests and tunnels", "timeout", s.cfg.Drain.D())
		hs.Close()
	}
	s.withdraw()      // nothing more is served here: other nodes forget this one
	s.closeSessions() // ends the tunnels left, forwarded ones included
	s.tunnels.Wait()
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// ReloadTLS reads the certificate, key and client CA again (on SIGHUP).
// Sessions already up are not disturbed. Without TLS it does nothing.
func (s *Server) ReloadTLS() error {
	if s.certs == nil {
		return nil
	}
	return s.certs.Reload()
}

// isLoopback reports whether addr is a loopback address, reachable only
// from this machine.
func isLoopback(addr net.Addr) bool {
	ta, ok := addr.(*net.TCPAddr)
	return ok && ta.IP.IsLoopback()
}

// waitCtx waits for wg until ctx ends.
func waitCtx(ctx context.Context, wg *sync.WaitGroup) error {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err() // the waiting goroutine ends with the last tunnel
	}
}

func (s *Server) closeSessions() {
	s.stopMu.Lock()
	s.stopped = true
	s.stopMu.Unlock()
	close(s.closing)
	s.endLife() // closes the connections to other nodes
	<-s.reaped
	s.sessions.Wait()
	s.chores.Wait()
}

// enter counts a session or tunnel about to leave http.Server's tracking
// (hijacked), unless the server is past its drain: then false.
func (s *Server) enter(wg *sync.WaitGroup) bool {
	s.stopMu.Lock()
	defer s.stopMu.Unlock()
	if s.stopped {
		return false
	}
	wg.Add(1)
	return true
}

// ServeHTTP routes the server's endpoints.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if via, e := s.fromNode(r); e != nil {
		httperr.Write(w, e)
		return
	} else if via != "" {
		r = r.WithContext(context.WithValue(r.Context(), viaKey{}, via))
	}
	if r.Method == http.MethodConnect {
		s.connect(w, r)
		return
	}
	if r.URL.IsAbs() {
		s.relay(w, r, "proxy", r.URL)
		return
	}
	switch r.URL.Path {
	case "/register":
		s.register(w, r)
	case "/request":
		dest, err := parseDestination(r.Header.Get(headerDestination))
		if err != nil {
			writeError(w, err)
			return
		}
		s.relay(w, r, "request", dest)
	case "/status", "/healthz":
		plain(w, http.StatusOK, "ok")
	case "/readyz":
		s.readyz(w, r)
	default:
		plain(w, http.StatusNotFound, "not found: wsp serves /request, /register, /status, /healthz, /readyz and proxy requests")
	}
}

func plain(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	fmt.Fprintln(w, msg)
}
