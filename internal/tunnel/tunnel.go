// Package tunnel is wsp's session protocol: a WebSocket negotiated with
// subprotocol wsp.v2 carries a yamux session; the server opens one stream per
// relayed request. See docs/protocol.md.
package tunnel

import (
	"context"
	"errors"
	"io"
	"net"
	"time"

	"github.com/coder/websocket"
	"github.com/hashicorp/yamux"
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
	y.EnableKeepAlive = c.KeepAlive > 0
	if c.KeepAlive > 0 {
		y.KeepAliveInterval = c.KeepAlive
		// A ping waits this long for its answer: silent for two intervals
		// in all means dead.
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

// NewServerSession wraps an accepted WebSocket. The server opens the streams.
// ctx bounds the WebSocket: cancelling it closes the session.
func NewServerSession(ctx context.Context, ws *websocket.Conn, cfg Config) (*Session, error) {
	return newSession(ctx, ws, cfg, yamux.Client)
}

// NewClientSession wraps a dialed WebSocket. The client accepts streams.
func NewClientSession(ctx context.Context, ws *websocket.Conn, cfg Config) (*Session, error) {
	return newSession(ctx, ws, cfg, yamux.Server)
}

func newSession(ctx context.Context, ws *websocket.Conn, cfg Config, mux func(io.ReadWriteCloser, *yamux.Config) (*yamux.Session, error)) (*Session, error) {
	nc := websocket.NetConn(ctx, ws, websocket.MessageBinary)
	// NetConn lifts the read limit; one message holds at most one frame.
	ws.SetReadLimit(int64(cfg.StreamWindow) + yamuxHeaderSize + maxCoalesce)
	fc := &frameConn{Conn: nc}
	fc.lastRead.Store(time.Now().UnixNano())
	s, err := mux(fc, cfg.yamux())
	if err != nil {
		nc.Close()
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
