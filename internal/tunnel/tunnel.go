// Package tunnel is wsp's session protocol: a WebSocket negotiated with
// subprotocol wsp.v2 carries a yamux session; the server opens one stream per
// relayed request. See docs/protocol.md.
package tunnel

import (
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/hashicorp/yamux"

	"wsp/internal/httperr"
)

// Subprotocol is the WebSocket subprotocol of this protocol version. An
// upgrade request that does not offer it speaks the legacy protocol.
const Subprotocol = "wsp.v2"

// Config tunes a session. The zero value is not valid; start from
// DefaultConfig.
type Config struct {
	// KeepAlive is the ping interval. A peer that does not answer a ping
	// within another interval is dead and its session is closed.
	KeepAlive time.Duration
	// StreamWindow is the most a stream buffers before the sender must wait:
	// it bounds memory per stream and sets the throughput of one stream over
	// a link with latency (window / RTT).
	StreamWindow uint32
	// AcceptBacklog bounds streams opened but not yet accepted.
	AcceptBacklog int
	// OwnerPings: the session's owner calls Ping every KeepAlive and closes
	// the session when it fails, instead of each session running a
	// goroutine of its own for it (the server, holding thousands).
	OwnerPings bool
}

// DefaultConfig returns the settings both sides use unless configured.
func DefaultConfig() Config {
	return Config{
		KeepAlive:     15 * time.Second,
		StreamWindow:  1 << 20,
		AcceptBacklog: 256,
	}
}

// Validate reports a setting yamux would reject.
func (c Config) Validate() error {
	return yamux.VerifyConfig(c.yamux())
}

func (c Config) yamux() *yamux.Config {
	y := yamux.DefaultConfig()
	y.AcceptBacklog = c.AcceptBacklog
	y.EnableKeepAlive = c.KeepAlive > 0 && !c.OwnerPings
	if c.KeepAlive > 0 {
		y.KeepAliveInterval = c.KeepAlive
		// A ping waits this long for its answer: silent for two intervals
		// in all means dead. This holds for OwnerPings too.
		y.ConnectionWriteTimeout = c.KeepAlive
	}
	y.MaxStreamWindowSize = c.StreamWindow
	y.StreamOpenTimeout = 0 // opening never blocks on the peer; requests have their own deadlines
	y.StreamCloseTimeout = time.Minute
	y.LogOutput = io.Discard // sessions report their end to the owner, who logs it once
	return y
}

// Session is one client connection: a yamux session over a WebSocket.
type Session struct {
	*yamux.Session
	conn *frameConn
}

// Buffer sizes. CopyBufferSize is what the relays (server, client, Join)
// read and write at a time: bulk transfers cost a few syscalls per read
// and per frame, so bigger chunks move more bytes per syscall (see
// docs/performance.md). A frame is written as one WebSocket
// frame when it fits the write buffer, so the write buffer holds the
// largest frame the relays produce; it is pooled, so an idle session holds
// none.
const (
	CopyBufferSize = 128 << 10
	ReadBufferSize = 16 << 10
	// ServerReadBufferSize is the server's WebSocket read buffer per
	// session (http.Server's 4 KiB one is let go at the upgrade).
	ServerReadBufferSize = 1 << 10
	WriteBufferSize      = CopyBufferSize + yamuxHeaderSize + 14
)

// WriteBufferPool is shared by every session's WebSocket writes.
var WriteBufferPool websocket.BufferPool = &sync.Pool{}

// NewServerSession wraps an accepted WebSocket. The server opens the streams.
func NewServerSession(ws *websocket.Conn, cfg Config) (*Session, error) {
	return newSession(ws, cfg, yamux.Client)
}

// NewClientSession wraps a dialed WebSocket. The client accepts streams.
func NewClientSession(ws *websocket.Conn, cfg Config) (*Session, error) {
	return newSession(ws, cfg, yamux.Server)
}

func newSession(ws *websocket.Conn, cfg Config, mux func(io.ReadWriteCloser, *yamux.Config) (*yamux.Session, error)) (*Session, error) {
	// One message holds one frame: bigger means a broken or hostile peer.
	ws.SetReadLimit(int64(cfg.StreamWindow) + yamuxHeaderSize)
	fc := &frameConn{ws: ws}
	fc.lastRead.Store(time.Now().UnixNano())
	s, err := mux(fc, cfg.yamux())
	if err != nil {
		ws.Close()
		return nil, err
	}
	return &Session{Session: s, conn: fc}, nil
}

// IdleFor reports how long nothing at all, not even a keepalive, has arrived.
func (s *Session) IdleFor() time.Duration {
	return time.Duration(time.Now().UnixNano() - s.conn.lastRead.Load())
}

// Err says why the connection under the session stopped reading, once it has.
func (s *Session) Err() error {
	if p := s.conn.readErr.Load(); p != nil {
		return *p
	}
	return nil
}

// maxCloseReason is the most text a WebSocket close message carries: a
// control frame's 125 bytes less the 2 of the code.
const maxCloseReason = 123

// CloseWithReason closes the session as Close does, first telling the peer
// why in a WebSocket close message (1000, reason), which ends the peer's
// side at once and which its log shows as the cause.
func (s *Session) CloseWithReason(reason string) error {
	if len(reason) > maxCloseReason {
		reason = strings.ToValidUTF8(reason[:maxCloseReason], "")
	}
	msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, reason)
	s.conn.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
	return s.Close()
}

// RemoteAddr is the peer's address as the WebSocket saw it.
func (s *Session) RemoteAddr() net.Addr { return s.conn.RemoteAddr() }

// IsSessionGone reports whether err means the whole session is unusable (as
// opposed to one stream failing), so a request not yet sent may go elsewhere.
func IsSessionGone(err error) bool {
	return errors.Is(err, yamux.ErrSessionShutdown) ||
		errors.Is(err, yamux.ErrRemoteGoAway) ||
		errors.Is(err, yamux.ErrStreamsExhausted) ||
		errors.Is(err, yamux.ErrConnectionWriteTimeout) ||
		errors.Is(err, yamux.ErrKeepAliveTimeout)
}

// NewUpgrader returns the WebSocket upgrader for /register, negotiating this
// protocol's subprotocol.
func NewUpgrader(handshakeTimeout time.Duration) *websocket.Upgrader {
	return &websocket.Upgrader{
		HandshakeTimeout: handshakeTimeout,
		Subprotocols:     []string{Subprotocol},
		// Small: thousands of idle sessions each keep it. yamux reads
		// through a 4 KiB buffer of its own, so frame bodies bypass this
		// one; it holds WebSocket frame headers and small frames.
		ReadBufferSize:  ServerReadBufferSize,
		WriteBufferSize: WriteBufferSize,
		WriteBufferPool: WriteBufferPool,
		// Refusals are answered before the upgrade, as plain HTTP.
		Error: func(w http.ResponseWriter, r *http.Request, status int, reason error) {
			httperr.Write(w, httperr.New(status, httperr.BadRequest, "WebSocket upgrade failed: %v", reason))
		},
	}
}

// NewDialer returns the WebSocket dialer clients use, through the
// environment's HTTP proxy settings like any HTTP client.
func NewDialer(handshakeTimeout time.Duration) *websocket.Dialer {
	return &websocket.Dialer{
		Proxy:            http.ProxyFromEnvironment,
		HandshakeTimeout: handshakeTimeout,
		Subprotocols:     []string{Subprotocol},
		ReadBufferSize:   ReadBufferSize,
		WriteBufferSize:  WriteBufferSize,
		WriteBufferPool:  WriteBufferPool,
	}
}
