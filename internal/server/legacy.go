package server

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"wsp/internal/httperr"
	"wsp/internal/legacy"
	"wsp/internal/tunnel"
)

// registerLegacy accepts an old root-gg/wsp client: an upgrade without a
// wsp subprotocol, authenticated by X-SECRET-KEY only, then a greeting
// "<id>_<poolidlesize>". Each of its connections serves one request at a
// time, so each becomes a session of its own with one stream slot; the
// old client opens several to serve requests in parallel.
func (s *Server) registerLegacy(w http.ResponseWriter, r *http.Request) {
	remote := r.RemoteAddr
	if e := s.checkClient(tunnel.Hello{SecretKey: r.Header.Get(tunnel.HeaderSecretKey)}); e != nil {
		s.refuse(w, remote, "", e)
		return
	}
	if e := s.reg.room("", s.cfg.MaxSessions, math.MaxInt); e != nil { // the id comes later
		s.refuse(w, remote, "", e)
		return
	}
	if !s.enter(&s.sessions) {
		s.refuse(w, remote, "", httperr.New(http.StatusServiceUnavailable, httperr.Draining, "server is shutting down"))
		return
	}
	id := fmt.Sprintf("%016x", rand.Uint64())
	ws, err := s.upgrader.Upgrade(w, r, http.Header{tunnel.HeaderSession: {id}})
	if err != nil {
		s.sessions.Done()
		s.metrics.HandshakeFailure("upgrade")
		s.log.Warn("register refused", "remote", remote, "cause", err)
		return
	}
	ws.SetReadLimit(int64(s.cfg.MaxMessageBytes) + 64<<10) // a body, or a head with its headers
	ws.SetReadDeadline(time.Now().Add(s.cfg.HandshakeTimeout.D()))
	typ, msg, err := ws.ReadMessage()
	var clientID string
	if err == nil && typ != websocket.TextMessage {
		err = fmt.Errorf("%w: first message is not a text greeting", legacy.ErrProtocol)
	}
	if err == nil {
		clientID, _, err = legacy.ParseGreeting(string(msg))
	}
	if err == nil && !tunnel.ValidID(clientID) {
		err = fmt.Errorf("%w: client id %q: want 1-128 of A-Z a-z 0-9 . _ -", legacy.ErrProtocol, clientID)
	}
	if err == nil {
		if e := s.reg.room(clientID, s.cfg.MaxSessions, s.cfg.MaxSessionsPerID); e != nil {
			err = e
		}
	}
	if err != nil {
		s.sessions.Done()
		s.metrics.HandshakeFailure("bad_request")
		s.log.Warn("register refused", "remote", remote, "client", clientID, "cause", err)
		ws.Close()
		return
	}
	ws.SetReadDeadline(time.Time{})
	lc := newLegacyConn(ws, int64(s.cfg.MaxMessageBytes), s.cfg.LegacyTimeout.D())
	s.startSession(&session{
		conn:       lc,
		legacy:     lc,
		clientID:   clientID,
		id:         id,
		remote:     remote,
		version:    "root-gg/wsp",
		since:      time.Now(),
		maxStreams: 1,
	})
}

// legacyMessage is one WebSocket message from an old client.
type legacyMessage struct {
	typ  int
	data []byte
}

// legacyConn is the server's side of an old client's connection. A reader
// goroutine, started by newLegacyConn and ended by Close, reads every
// message (so pings are answered and a dead peer is noticed while idle) and
// hands answers to the request waiting for one.
type legacyConn struct {
	ws         *websocket.Conn
	maxMessage int64
	timeout    time.Duration // for an answer to arrive

	msgs     chan legacyMessage // from the reader, while a request waits
	waiting  atomic.Bool        // a request is out: messages are expected
	lastRead atomic.Int64       // unix nanos
	writeMu  sync.Mutex         // one writer at a time, as gorilla requires; never held while waiting

	closed    chan struct{}
	closeOnce sync.Once
	err       atomic.Pointer[error]
	done      chan struct{} // closed when the reader has returned
}

func newLegacyConn(ws *websocket.Conn, maxMessage int64, timeout time.Duration) *legacyConn {
	c := &legacyConn{
		ws: ws, maxMessage: maxMessage, timeout: timeout,
		msgs:   make(chan legacyMessage, 2),
		closed: make(chan struct{}),
		done:   make(chan struct{}),
	}
	c.lastRead.Store(time.Now().UnixNano())
	ws.SetPingHandler(func(data string) error {
		c.lastRead.Store(time.Now().UnixNano())
		err := ws.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(5*time.Second))
		if errors.Is(err, websocket.ErrCloseSent) {
			return nil
		}
		return err
	})
	go c.read()
	return c
}

func (c *legacyConn) read() {
	defer close(c.done)
	for {
		typ, data, err := c.ws.ReadMessage()
		if err != nil {
			c.fail(err)
			return
		}
		c.lastRead.Store(time.Now().UnixNano())
		if !c.waiting.Load() {
			c.fail(fmt.Errorf("%w: a message while no request was out", legacy.ErrProtocol))
			return
		}
		select {
		case c.msgs <- legacyMessage{typ, data}:
		default:
			c.fail(fmt.Errorf("%w: more messages than one answer", legacy.ErrProtocol))
			return
		}
	}
}

// fail records why the connection ends and ends it, without waiting for
// the reader (which may be the caller).
func (c *legacyConn) fail(err error) {
	c.err.CompareAndSwap(nil, &err)
	c.shutdown()
}

func (c *legacyConn) shutdown() {
	c.closeOnce.Do(func() {
		close(c.closed)
		c.ws.Close()
	})
}

// Close ends the connection and waits for the reader; idempotent.
func (c *legacyConn) Close() error {
	c.shutdown()
	<-c.done
	return nil
}

func (c *legacyConn) CloseChan() <-chan struct{} { return c.closed }

func (c *legacyConn) IdleFor() time.Duration {
	return time.Duration(time.Now().UnixNano() - c.lastRead.Load())
}

func (c *legacyConn) Err() error {
	if p := c.err.Load(); p != nil {
		return *p
	}
	return nil
}

// errLegacyUnsent: the request never left, so another session may take it.
var errLegacyUnsent = errors.New("legacy connection closed before the request was sent")

// roundTrip sends req as one head message and one body message and waits
// for the answer the same way. The body is read whole first, within
// maxMessage. The protocol cannot cancel a request, so when the app goes
// away or the answer is late, the connection is closed (the old client
// opens another).
func (c *legacyConn) roundTrip(req *http.Request, clientID string) (*http.Response, error) {
	if tunnel.UpgradeType(req.Header) != "" {
		return nil, httperr.New(http.StatusBadGateway, httperr.ClientError, "client %q speaks the legacy protocol, which cannot carry protocol upgrades (WebSocket)", clientID)
	}
	var body []byte
	if req.Body != nil && req.Body != http.NoBody {
		var err error
		body, err = io.ReadAll(io.LimitReader(req.Body, c.maxMessage+1))
		if err != nil {
			return nil, err
		}
		if int64(len(body)) > c.maxMessage {
			return nil, httperr.New(http.StatusRequestEntityTooLarge, httperr.BodyTooLarge, "client %q speaks the legacy protocol, which carries bodies whole: this one exceeds %d bytes (maxmessagebytes)", clientID, c.maxMessage)
		}
	}
	head, _ := json.Marshal(legacy.RequestHead{Method: req.Method, URL: req.URL.String(), Header: req.Header, ContentLength: int64(len(body))})

	if len(c.msgs) > 0 {
		// A message no request asked for: it must not pass for this
		// request's answer.
		c.fail(fmt.Errorf("%w: a message while no request was out", legacy.ErrProtocol))
		req.Body = io.NopCloser(bytes.NewReader(body))
		return nil, fmt.Errorf("%w: stray message", errLegacyUnsent)
	}
	c.waiting.Store(true)
	c.writeMu.Lock()
	c.ws.SetWriteDeadline(time.Now().Add(c.timeout))
	err := c.ws.WriteMessage(websocket.TextMessage, head)
	if err == nil {
		err = c.ws.WriteMessage(websocket.BinaryMessage, body)
	}
	c.writeMu.Unlock()
	if err != nil {
		c.fail(err)
		// The body was read whole: put it back for another session.
		req.Body = io.NopCloser(bytes.NewReader(body))
		return nil, fmt.Errorf("%w: %v", errLegacyUnsent, err)
	}

	broken := func(err error) (*http.Response, error) {
		c.fail(err)
		if e, ok := errors.AsType[*httperr.Error](err); ok {
			return nil, e
		}
		return nil, httperr.Wrap(err, http.StatusBadGateway, httperr.TunnelBroken, "the connection to legacy client %q broke", clientID)
	}
	timer := time.NewTimer(c.timeout)
	defer timer.Stop()
	next := func() (legacyMessage, error) {
		select {
		case m := <-c.msgs:
			return m, nil
		case <-c.closed:
			if err := c.Err(); err != nil {
				return legacyMessage{}, err
			}
			return legacyMessage{}, errors.New("connection closed")
		case <-req.Context().Done():
			c.fail(errors.New("the app went away: a legacy request cannot be cancelled"))
			return legacyMessage{}, req.Context().Err()
		case <-timer.C:
			err := fmt.Errorf("no answer within %s (legacytimeout)", c.timeout)
			c.fail(err)
			return legacyMessage{}, httperr.Wrap(err, http.StatusGatewayTimeout, httperr.DestinationTimeout, "legacy client %q did not answer in time", clientID)
		}
	}
	m, err := next()
	if err != nil {
		return broken(err)
	}
	if m.typ != websocket.TextMessage {
		return broken(fmt.Errorf("%w: answer head is not a text message", legacy.ErrProtocol))
	}
	rh, err := legacy.DecodeResponseHead(m.data)
	if err != nil {
		return broken(err)
	}
	if m, err = next(); err != nil {
		return broken(err)
	}
	if m.typ != websocket.BinaryMessage {
		return broken(fmt.Errorf("%w: answer body is not a binary message", legacy.ErrProtocol))
	}
	c.waiting.Store(false)
	if rh.StatusCode < 200 {
		return nil, httperr.New(http.StatusBadGateway, httperr.ClientError, "legacy client %q answered %d, which its protocol cannot carry", clientID, rh.StatusCode)
	}
	if rh.StatusCode == legacy.StatusClientError {
		// root-gg/wsp's "refused or failed", with the reason as the body.
		msg, _, _ := strings.Cut(string(m.data), "\n")
		return nil, httperr.New(http.StatusBadGateway, httperr.ClientError, "legacy client %q could not serve the request: %s", clientID, msg)
	}
	h := rh.Header
	if h == nil {
		h = http.Header{}
	}
	h.Del("Content-Length")
	h.Del("Transfer-Encoding")
	return &http.Response{
		Status:        fmt.Sprintf("%d %s", rh.StatusCode, http.StatusText(rh.StatusCode)),
		StatusCode:    rh.StatusCode,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        h,
		Body:          io.NopCloser(bytes.NewReader(m.data)),
		ContentLength: int64(len(m.data)),
		Request:       req,
	}, nil
}
