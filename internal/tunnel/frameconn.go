package tunnel

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// yamux frame header layout (hashicorp/yamux const.go): version(1) type(1)
// flags(2) stream id(4) length(4). For a data frame, length is the size of the
// body written right after the header.
const (
	yamuxHeaderSize = 12
	yamuxTypeData   = 0
)

// errTextMessage: the protocol carries binary messages only.
var errTextMessage = errors.New("unexpected text message on a wsp.v2 session")

// frameConn is the byte stream yamux runs on: reads concatenate the
// WebSocket's binary messages, and each yamux frame (header and body) goes
// out as one message. yamux writes a frame's header and body with two Write
// calls; sent as they come, every frame would cost two messages, two
// WebSocket headers and two syscalls.
//
// Concurrency: Read is called only by the yamux receive loop and Write only
// by its send loop, one call at a time each, which is what gorilla/websocket
// allows (one reader, one writer); frameConn holds no lock of its own.
type frameConn struct {
	ws       *websocket.Conn
	r        io.Reader             // the message being read; nil between messages
	lastRead atomic.Int64          // unix nanos of the last read that returned data
	readErr  atomic.Pointer[error] // the first read error: why the session ended

	held    [yamuxHeaderSize]byte // a data frame header waiting for its body
	holding bool
}

func (c *frameConn) Read(p []byte) (int, error) {
	for {
		if c.r == nil {
			typ, r, err := c.ws.NextReader()
			if err != nil {
				return 0, c.readFailed(err)
			}
			if typ != websocket.BinaryMessage {
				return 0, c.readFailed(errTextMessage)
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if err == io.EOF {
			c.r = nil
			err = nil
			if n == 0 {
				continue
			}
		}
		if n > 0 {
			c.lastRead.Store(time.Now().UnixNano())
		}
		if err != nil {
			return n, c.readFailed(err)
		}
		return n, nil
	}
}

func (c *frameConn) readFailed(err error) error {
	c.readErr.CompareAndSwap(nil, &err)
	return err
}

func (c *frameConn) Write(p []byte) (int, error) {
	if c.holding {
		c.holding = false
		w, err := c.ws.NextWriter(websocket.BinaryMessage)
		if err != nil {
			return 0, err
		}
		if _, err := w.Write(c.held[:]); err != nil {
			return 0, err
		}
		if _, err := w.Write(p); err != nil {
			return 0, err
		}
		if err := w.Close(); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	if len(p) == yamuxHeaderSize && p[1] == yamuxTypeData && binary.BigEndian.Uint32(p[8:]) > 0 {
		copy(c.held[:], p)
		c.holding = true
		return len(p), nil
	}
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close closes the connection without a close handshake: the session is
// over, and yamux already told the peer what it needed to know.
func (c *frameConn) Close() error { return c.ws.Close() }

func (c *frameConn) RemoteAddr() net.Addr { return c.ws.RemoteAddr() }
