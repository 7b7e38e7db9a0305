// Package server is wsp's public side: it accepts client sessions on
// /register and relays app requests through them.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"wsp/internal/config"
	"wsp/internal/rules"
	"wsp/internal/tunnel"
)

// handshakeTimeout bounds reading a request head, on /register as on app
// requests: a peer trickling its headers (slowloris) is cut off.
const handshakeTimeout = 10 * time.Second

// Server relays app requests to registered clients. Create it with New and
// run it with Serve.
type Server struct {
	cfg      config.Server
	log      *slog.Logger
	rules    *rules.Set
	tunnel   tunnel.Config
	reg      *registry
	proxy    *httputil.ReverseProxy
	upgrader *websocket.Upgrader

	draining atomic.Bool   // set when Serve's context ends: /readyz fails, /register refuses
	closing  chan struct{} // closed when the drain is over: sessions end
	sessions sync.WaitGroup
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
	if err := tc.Validate(); err != nil {
		return nil, fmt.Errorf("tunnel settings: %w", err)
	}
	s := &Server{
		cfg:      cfg,
		log:      log,
		rules:    rs,
		tunnel:   tc,
		reg:      newRegistry(),
		upgrader: tunnel.NewUpgrader(handshakeTimeout),
		closing:  make(chan struct{}),
	}
	s.proxy = s.newProxy()
	return s, nil
}

// Serve answers on ln until ctx ends, then drains: it stops accepting, lets
// in-flight requests finish for up to the configured drain time, closes the
// client sessions and returns. It closes ln.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	hs := &http.Server{
		Handler:           s,
		ReadHeaderTimeout: handshakeTimeout,
		MaxHeaderBytes:    s.cfg.MaxHeaderBytes,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case err := <-errc:
		s.closeSessions()
		return fmt.Errorf("serve %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}

	s.draining.Store(true)
	s.log.Info("draining", "timeout", s.cfg.Drain.D())
	dctx, cancel := context.WithTimeout(context.Background(), s.cfg.Drain.D())
	defer cancel()
	if err := hs.Shutdown(dctx); err != nil {
		s.log.Warn("drain timed out; closing in-flight requests", "timeout", s.cfg.Drain.D())
		hs.Close()
	}
	s.closeSessions()
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func (s *Server) closeSessions() {
	close(s.closing)
	s.sessions.Wait()
}

// ServeHTTP routes the server's endpoints.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
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
		if s.draining.Load() {
			plain(w, http.StatusServiceUnavailable, "draining")
			return
		}
		plain(w, http.StatusOK, "ok")
	default:
		plain(w, http.StatusNotFound, "not found: wsp serves /request, /register, /status, /healthz, /readyz and proxy requests")
	}
}

func plain(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	fmt.Fprintln(w, msg)
}
