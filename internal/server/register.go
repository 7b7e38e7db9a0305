package server

import (
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"

	"wsp/internal/httperr"
	"wsp/internal/rules"
	"wsp/internal/tunnel"
)

// register upgrades a client's /register request into a session and keeps
// it in the registry until it ends. The handler's goroutine owns the session.
func (s *Server) register(w http.ResponseWriter, r *http.Request) {
	remote := r.RemoteAddr
	if s.draining.Load() {
		httperr.Write(w, httperr.New(http.StatusServiceUnavailable, httperr.Draining, "server is draining; connect to another node"))
		return
	}
	if !offersAny(r, "wsp.") {
		s.registerLegacy(w, r)
		return
	}
	if !offers(r, tunnel.Subprotocol) {
		s.refuse(w, remote, "", httperr.New(http.StatusBadRequest, httperr.BadRequest, "the upgrade offers no protocol version this server speaks (it speaks %s)", tunnel.Subprotocol))
		return
	}
	hello, err := tunnel.ParseHello(r.Header)
	if err != nil {
		s.refuse(w, remote, "", httperr.Wrap(err, http.StatusBadRequest, httperr.BadRequest, "invalid registration"))
		return
	}
	if e := s.checkClient(hello); e != nil {
		s.refuse(w, remote, hello.ClientID, e)
		return
	}
	if e := s.reg.room(hello.ClientID, s.cfg.MaxSessions, s.cfg.MaxSessionsPerID); e != nil {
		s.refuse(w, remote, hello.ClientID, e)
		return
	}
	clientRules, err := rules.NewSet(hello.Rules.Whitelist, hello.Rules.Blacklist)
	if err != nil { // ParseHello compiled them already
		s.refuse(w, remote, hello.ClientID, httperr.Wrap(err, http.StatusBadRequest, httperr.BadRequest, "invalid rules"))
		return
	}

	if !s.enter(&s.sessions) {
		s.refuse(w, remote, hello.ClientID, httperr.New(http.StatusServiceUnavailable, httperr.Draining, "server is shutting down"))
		return
	}
	id := fmt.Sprintf("%016x", rand.Uint64())
	answer := http.Header{tunnel.HeaderSession: {id}, tunnel.HeaderNode: {s.node}}
	if n := s.cfg.Cluster.Nodes; n > 0 {
		answer.Set(tunnel.HeaderNodes, strconv.Itoa(n))
	}
	ws, err := s.upgrader.Upgrade(w, r, answer)
	if err != nil {
		s.sessions.Done()
		s.metrics.HandshakeFailure("upgrade")
		s.log.Warn("register refused", "remote", remote, "client", hello.ClientID, "cause", err)
		return
	}
	ts, err := tunnel.NewServerSession(ws, s.tunnel)
	if err != nil {
		s.sessions.Done()
		s.log.Error("session setup failed", "remote", remote, "client", hello.ClientID, "cause", err)
		return
	}
	sess := &session{
		conn:       ts,
		mux:        ts,
		clientID:   hello.ClientID,
		id:         id,
		remote:     remote,
		version:    hello.Version,
		since:      time.Now(),
		maxStreams: int64(min(hello.MaxStreams, s.cfg.MaxStreams)),
		rules:      clientRules,
	}
	s.serveSession(sess)
}

// serveSession keeps sess in the registry until it ends, and logs both.
// The caller has counted it in s.sessions (enter); serveSession counts it out.
func (s *Server) serveSession(sess *session) {
	defer s.sessions.Done()
	s.reg.add(sess)
	s.clusterChanged()
	s.metrics.SessionUp(sess.clientID)
	s.log.Info("client connected", "client", sess.clientID, "session", sess.id, "remote", sess.remote, "version", sess.version)

	cause := s.watch(sess)
	left := s.reg.remove(sess)
	if left == 0 {
		s.clusterChanged() // the directory drops the id
	}
	s.metrics.SessionDown(sess.clientID, left)
	sess.Close()
	s.log.Info("client disconnected", "client", sess.clientID, "session", sess.id, "remote", sess.remote,
		"cause", cause, "duration", time.Since(sess.since).Round(time.Millisecond), "requests", sess.requests.Load())
}

// watch waits for sess to end and says why.
func (s *Server) watch(sess *session) string {
	idle := s.cfg.IdleTimeout.D()
	period := idleStreamTimeout / 4
	if idle > 0 {
		period = min(period, max(idle/4, 10*time.Millisecond))
	}
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-sess.CloseChan():
			if err := sess.Err(); err != nil {
				return "connection lost: " + err.Error()
			}
			return "connection lost"
		case <-s.closing:
			return "server shutting down"
		case <-t.C:
			if d := sess.IdleFor(); idle > 0 && d > idle {
				return fmt.Sprintf("nothing received for %s (idletimeout)", d.Round(time.Millisecond))
			}
			if sess.mux != nil {
				sess.closeIdleStreams(time.Now().Add(-idleStreamTimeout))
			}
		}
	}
}

// refuse answers a registration that failed before the upgrade and logs it
// with the remote address (never with the credential).
func (s *Server) refuse(w http.ResponseWriter, remote, clientID string, e *httperr.Error) {
	s.metrics.HandshakeFailure(e.Code)
	s.log.Warn("register refused", "remote", remote, "client", clientID, "status", e.Status, "cause", e.Error())
	httperr.Write(w, e)
}

// offersAny reports whether the upgrade offers a subprotocol starting with
// prefix.
func offersAny(r *http.Request, prefix string) bool {
	for _, h := range r.Header.Values("Sec-WebSocket-Protocol") {
		for _, p := range strings.Split(h, ",") {
			if strings.HasPrefix(strings.TrimSpace(p), prefix) {
				return true
			}
		}
	}
	return false
}

func offers(r *http.Request, proto string) bool {
	for _, h := range r.Header.Values("Sec-WebSocket-Protocol") {
		for _, p := range strings.Split(h, ",") {
			if strings.TrimSpace(p) == proto {
				return true
			}
		}
	}
	return false
}
