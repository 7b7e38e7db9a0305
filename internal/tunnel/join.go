package tunnel

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"
)

// End is one end of a byte pipe: a connection and the reader its bytes come
// from (a bufio.Reader over it may already hold some).
type End struct {
	Conn   net.Conn
	Reader io.Reader // nil: Conn itself
}

func (e End) reader() io.Reader {
	if e.Reader != nil {
		return e.Reader
	}
	return e.Conn
}

// closeWrite ends what goes to c while its other direction goes on: a TCP
// FIN, or a yamux stream's FIN (a yamux Close only closes the write side).
func closeWrite(c net.Conn) {
	switch c := c.(type) {
	case *yamux.Stream:
		c.Close()
	case interface{ CloseWrite() error }:
		c.CloseWrite()
	default:
		c.Close()
	}
}

var joinBuffers = sync.Pool{New: func() any { b := make([]byte, CopyBufferSize); return &b }}

// Join copies a to b and b to a until both directions end, and closes both.
// When one side ends its direction (EOF), the other side gets a half-close,
// so protocols that signal the end of a request by closing work through it.
// An error on either direction ends both. With idle > 0, a pipe that moves
// no byte either way for that long is closed. It returns the bytes copied
// each way.
func Join(a, b End, idle time.Duration) (aToB, bToA int64) {
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			// A reader still waiting on a yamux stream closed on this side
			// must not wait for the peer (see stopReading in the client).
			for _, c := range []net.Conn{a.Conn, b.Conn} {
				c.SetReadDeadline(time.Now())
				c.Close()
			}
		})
	}
	pump := func(dst, src End, n *int64, done chan<- struct{}) {
		defer close(done)
		bufp := joinBuffers.Get().(*[]byte)
		defer joinBuffers.Put(bufp)
		buf := *bufp
		for {
			k, rerr := src.reader().Read(buf)
			if k > 0 {
				last.Store(time.Now().UnixNano())
				if _, werr := dst.Conn.Write(buf[:k]); werr != nil {
					closeBoth()
					return
				}
				*n += int64(k)
			}
			if rerr == io.EOF {
				closeWrite(dst.Conn)
				return
			}
			if rerr != nil {
				closeBoth()
				return
			}
		}
	}
	abDone, baDone := make(chan struct{}), make(chan struct{})
	go pump(b, a, &aToB, abDone)
	go pump(a, b, &bToA, baDone)

	var tick <-chan time.Time
	if idle > 0 {
		t := time.NewTicker(max(idle/4, 10*time.Millisecond))
		defer t.Stop()
		tick = t.C
	}
	for abDone != nil || baDone != nil {
		select {
		case <-abDone:
			abDone = nil
		case <-baDone:
			baDone = nil
		case <-tick:
			if time.Duration(time.Now().UnixNano()-last.Load()) > idle {
				closeBoth()
			}
		}
	}
	closeBoth()
	return aToB, bToA
}
