package tunnel

import (
	"encoding/binary"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// yamux frame header layout (hashicorp/yamux const.go): version(1) type(1)
// flags(2) stream id(4) length(4). For a data frame, length is the size of the
// body written right after the header.
const (
	yamuxHeaderSize = 12
	yamuxTypeData   = 0
	// maxCoalesce bounds the copy made to merge a header with its body;
	// larger bodies go out as their own message, where the extra message
	// costs nothing noticeable next to the payload.
	maxCoalesce = 64 << 10
)

var coalescePool = sync.Pool{New: func() any {
	b := make([]byte, 0, yamuxHeaderSize+maxCoalesce)
	return &b
}}

// frameConn sends each yamux data frame (header and body) as one WebSocket
// message. yamux writes a frame's header and body with two Write calls, and a
// WebSocket net.Conn turns every Write into a message: without this, every
// frame costs two messages, two frame headers and two syscalls.
//
// Concurrency: Write is called only by the yamux session's send loop, one
// call at a time; frameConn relies on that and holds no lock.
type frameConn struct {
	net.Conn
	lastRead atomic.Int64          // unix nanos of the last read that returned data
	readErr  atomic.Pointer[error] // the first read error: why the session ended
	held     [yamuxHeaderSize]byte
	holding  bool
}

func (c *frameConn) Write(p []byte) (int, error) {
	if c.holding {
		c.holding = false
		if len(p) <= maxCoalesce {
			bp := coalescePool.Get().(*[]byte)
			buf := append(append((*bp)[:0], c.held[:]...), p...)
			_, err := c.Conn.Write(buf)
			*bp = buf[:0]
			coalescePool.Put(bp)
			if err != nil {
				return 0, err
			}
			return len(p), nil
		}
		if _, err := c.Conn.Write(c.held[:]); err != nil {
			return 0, err
		}
		return c.Conn.Write(p)
	}
	if len(p) == yamuxHeaderSize && p[1] == yamuxTypeData && binary.BigEndian.Uint32(p[8:]) > 0 {
		copy(c.held[:], p)
		c.holding = true
		return len(p), nil
	}
	return c.Conn.Write(p)
}

func (c *frameConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.lastRead.Store(time.Now().UnixNano())
	}
	if err != nil {
		c.readErr.CompareAndSwap(nil, &err)
	}
	return n, err
}
