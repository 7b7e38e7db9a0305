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

// register upgrades a client's /register request into a session and puts
// it in the registry; the reaper looks after it from then on.
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
	s.startSession(sess)
}

// startSession puts sess in the registry, where requests find it, until
// the reaper ends it. The caller has counted it in s.sessions (enter).
// Nothing waits on the session from here: the handler that registered it
// returns, freeing its goroutine and buffers (see reap).
func (s *Server) startSession(sess *session) {
	// Announced before requests can find it, so that an end coming at
	// once is logged and counted after its start.
	s.metrics.SessionUp(sess.clientID)
	s.log.Info("client connected", "client", sess.clientID, "session", sess.id, "remote", sess.remote, "version", sess.version)
	s.reg.add(sess)
	s.clusterChanged()
	select {
	case <-s.closing: // the reaper's last sweep may have missed it
		s.endSession(sess, "server shutting down")
	default:
	}
}

// endSession takes sess out of the registry, then closes it and logs why
// it ended in a goroutine of its own (closing may wait on a peer that reads
// nothing, up to a TLS close_notify's deadline: never on the reaper). Only
// the first call for a session does anything.
func (s *Server) endSession(sess *session, cause string) {
	if !sess.ended.CompareAndSwap(false, true) {
		return
	}
	left := s.reg.remove(sess)
	if left == 0 {
		s.clusterChanged() // the directory drops the id
	}
	s.metrics.SessionDown(sess.clientID, left)
	go func() {
		sess.Close()
		s.log.Info("client disconnected", "client", sess.clientID, "session", sess.id, "remote", sess.remote,
			"cause", cause, "duration", time.Since(sess.since).Round(time.Millisecond), "requests", sess.requests.Load())
		s.sessions.Done()
	}()
}

// reapPeriod bounds how long an ended session stays in the registry (a
// request that picks it in the meantime goes to another: nothing was sent)
// and how late idletimeout is noticed.
const reapPeriod = 100 * time.Millisecond

// reap ends the sessions that closed or stayed silent past idletimeout,
// closes streams idle too long, and at shutdown ends every session. One
// goroutine looks after all sessions, rather than one each: at 10,000
// clients a waiting goroutine per session, with the registration request
// and buffers it kept, was a third of the server's memory.
func (s *Server) reap() {
	defer close(s.reaped)
	idle := s.cfg.IdleTimeout.D()
	period := reapPeriod
	if idle > 0 {
		period = min(period, max(idle/4, 10*time.Millisecond))
	}
	t := time.NewTicker(period)
	defer t.Stop()
	swept, pinged := time.Now(), time.Now()
	keepalive := s.tunnel.KeepAlive
	for {
		select {
		case <-s.closing:
			for _, sess := range s.reg.clear() {
				s.endSession(sess, "server shutting down")
			}
			return
		case now := <-t.C:
			sweep := now.Sub(swept) >= idleStreamTimeout/4
			if sweep {
				swept = now
			}
			ping := now.Sub(pinged) >= keepalive
			if ping {
				pinged = pinged.Add(keepalive)
			}
			for _, sess := range s.reg.sessions() {
				if cause := endedBy(sess, idle); cause != "" {
					s.endSession(sess, cause)
					continue
				}
				if sess.mux == nil {
					// Legacy clients: the server does not ping them (they
					// ping, as root-gg/wsp did); idletimeout ends the silent.
					continue
				}
				if sweep || ping {
					s.tend(sess, ping, sweep, now.Add(-idleStreamTimeout))
				}
			}
		}
	}
}

// tend pings sess's client (ping) and closes its streams idle since before
// cutoff (sweep), in a goroutine of its own, unless the last one is still
// at it:
// both may wait on the client (the ping for its answer, closing a stream to
// write a frame), and one stuck client must not hold up the reaper. A
// client that does not answer a ping within keepalive has its session
// ended (ConnectionWriteTimeout bounds Ping). The goroutine lives for the
// ping's round trip.
func (s *Server) tend(sess *session, ping, sweep bool, cutoff time.Time) {
	if !sess.tending.CompareAndSwap(false, true) {
		return
	}
	s.chores.Add(1)
	go func() {
		defer s.chores.Done()
		defer sess.tending.Store(false)
		if ping {
			if _, err := sess.mux.Ping(); err != nil {
				if !sess.mux.IsClosed() {
					s.endSession(sess, fmt.Sprintf("no answer to a keepalive ping within %s", s.tunnel.KeepAlive))
				}
				return
			}
		}
		if sweep {
			sess.closeIdleStreams(cutoff)
		}
	}()
}

// endedBy says why sess is over, or "" while it is not.
func endedBy(sess *session, idle time.Duration) string {
	select {
	case <-sess.CloseChan():
		if err := sess.Err(); err != nil {
			return "connection lost: " + err.Error()
		}
		return "connection lost"
	default:
	}
	if d := sess.IdleFor(); idle > 0 && d > idle {
		return fmt.Sprintf("nothing received for %s (idletimeout)", d.Round(time.Millisecond))
	}
	return ""
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
