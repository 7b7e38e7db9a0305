package tunnel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// wsPair returns the two ends of a plain WebSocket over loopback.
func wsPair(t *testing.T) (srv, cli *websocket.Conn) {
	t.Helper()
	got := make(chan *websocket.Conn, 1)
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := (&websocket.Upgrader{}).Upgrade(w, r, nil)
		if err != nil {
			t.Error(err)
			close(got)
			return
		}
		got <- ws
	}))
	t.Cleanup(hs.Close)
	cli, _, err := (&websocket.Dialer{}).Dial("ws"+strings.TrimPrefix(hs.URL, "http"), nil)
	if err != nil {
		t.Fatal(err)
	}
	srv = <-got
	if srv == nil {
		cli.Close()
		t.FailNow()
	}
	t.Cleanup(func() { cli.Close(); srv.Close() })
	return srv, cli
}

// yamuxHeader encodes a yamux frame header.
func yamuxHeader(typ byte, flags uint16, stream, length uint32) []byte {
	h := make([]byte, yamuxHeaderSize)
	h[0] = 0 // version
	h[1] = typ
	binary.BigEndian.PutUint16(h[2:], flags)
	binary.BigEndian.PutUint32(h[4:], stream)
	binary.BigEndian.PutUint32(h[8:], length)
	return h
}

// nextMessage reads one message from ws, failing the test after a deadline.
func nextMessage(t *testing.T, ws *websocket.Conn) (int, []byte) {
	t.Helper()
	ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	typ, p, err := ws.ReadMessage()
	if err != nil {
		t.Fatalf("reading a message: %v", err)
	}
	return typ, p
}

func mustWrite(t *testing.T, c *frameConn, p []byte) {
	t.Helper()
	if n, err := c.Write(p); n != len(p) || err != nil {
		t.Fatalf("Write(%d bytes) = %d, %v", len(p), n, err)
	}
}

// A data frame's header and body, written by yamux in two calls, leave as
// one binary message; other frames leave at once, each as its own message.
func TestFrameConnWriteCoalescesDataFrames(t *testing.T) {
	for _, n := range []int{1, 100, 4096, 70000} {
		peer, ws := wsPair(t)
		c := &frameConn{ws: ws}
		body := bytes.Repeat([]byte{0xAB}, n)
		hdr := yamuxHeader(yamuxTypeData, 0, 1, uint32(n))
		mustWrite(t, c, hdr)
		mustWrite(t, c, body)
		// A window update (type 1) carries a delta, not a body: it must not be
		// held, or it would swallow the next frame.
		wu := yamuxHeader(1, 0, 1, 1<<16)
		mustWrite(t, c, wu)
		// A data header with length 0 (a bare SYN or FIN) has no body.
		fin := yamuxHeader(yamuxTypeData, 4, 1, 0)
		mustWrite(t, c, fin)

		typ, got := nextMessage(t, peer)
		if typ != websocket.BinaryMessage || len(got) != yamuxHeaderSize+n || !bytes.Equal(got[:yamuxHeaderSize], hdr) || !bytes.Equal(got[yamuxHeaderSize:], body) {
			t.Fatalf("n=%d: first message: type %d, %d bytes; want one binary message of %d bytes", n, typ, len(got), yamuxHeaderSize+n)
		}
		if typ, got := nextMessage(t, peer); typ != websocket.BinaryMessage || !bytes.Equal(got, wu) {
			t.Fatalf("n=%d: second message: type %d %x, want the window update %x", n, typ, got, wu)
		}
		if typ, got := nextMessage(t, peer); typ != websocket.BinaryMessage || !bytes.Equal(got, fin) {
			t.Fatalf("n=%d: third message: type %d %x, want the empty data frame %x", n, typ, got, fin)
		}
	}
}

// Frames other than data go out as they are written, without waiting for a
// following Write.
func TestFrameConnWriteControlFramesImmediately(t *testing.T) {
	for _, typ := range []byte{1, 2, 3} { // window update, ping, go away
		peer, ws := wsPair(t)
		c := &frameConn{ws: ws}
		h := yamuxHeader(typ, 1, 0, 7)
		mustWrite(t, c, h)
		if mt, got := nextMessage(t, peer); mt != websocket.BinaryMessage || !bytes.Equal(got, h) {
			t.Fatalf("type %d: got message type %d %x, want %x", typ, mt, got, h)
		}
	}
}

func TestFrameConnReadConcatenates(t *testing.T) {
	peer, ws := wsPair(t)
	c := &frameConn{ws: ws}
	msgs := [][]byte{[]byte("abc"), {}, []byte("defgh"), bytes.Repeat([]byte("z"), 10000), []byte("!")}
	var want []byte
	for _, m := range msgs {
		if err := peer.WriteMessage(websocket.BinaryMessage, m); err != nil {
			t.Fatal(err)
		}
		want = append(want, m...)
	}
	ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, 0, len(want))
	buf := make([]byte, 3) // smaller than most messages, to split them
	for len(got) < len(want) {
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("Read after %d bytes: %v", len(got), err)
		}
		got = append(got, buf[:n]...)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %q..., want %q...", got[:min(20, len(got))], want[:20])
	}
	if c.lastRead.Load() == 0 {
		t.Error("lastRead not updated by a read that returned data")
	}
	if p := c.readErr.Load(); p != nil {
		t.Errorf("readErr = %v after clean reads", *p)
	}
}

func TestFrameConnReadTextMessage(t *testing.T) {
	peer, ws := wsPair(t)
	c := &frameConn{ws: ws}
	if err := peer.WriteMessage(websocket.TextMessage, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	ws.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 16)); !errors.Is(err, errTextMessage) {
		t.Fatalf("Read = %v, want errTextMessage", err)
	}
	// Later errors do not replace the first: it says why the session ended.
	peer.Close()
	if _, err := c.Read(make([]byte, 16)); err == nil {
		t.Fatal("Read after the peer closed succeeded")
	}
	if p := c.readErr.Load(); p == nil || !errors.Is(*p, errTextMessage) {
		t.Fatalf("readErr = %v, want errTextMessage", p)
	}
}

// A text message ends a session, and Err says so.
func TestSessionErrTextMessage(t *testing.T) {
	peer, ws := wsPair(t)
	s, err := NewClientSession(ws, DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := peer.WriteMessage(websocket.TextMessage, []byte("{}")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.CloseChan():
	case <-time.After(5 * time.Second):
		t.Fatal("session still open after a text message")
	}
	if !errors.Is(s.Err(), errTextMessage) {
		t.Fatalf("Err() = %v, want errTextMessage", s.Err())
	}
}

// A message bigger than one frame can be is refused: the read limit is on.
func TestSessionReadLimit(t *testing.T) {
	peer, ws := wsPair(t)
	cfg := DefaultConfig()
	cfg.StreamWindow = 256 << 10
	s, err := NewClientSession(ws, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := peer.WriteMessage(websocket.BinaryMessage, make([]byte, int(cfg.StreamWindow)+yamuxHeaderSize+1)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.CloseChan():
	case <-time.After(5 * time.Second):
		t.Fatal("session still open after an oversized message")
	}
	if !errors.Is(s.Err(), websocket.ErrReadLimit) {
		t.Fatalf("Err() = %v, want websocket.ErrReadLimit", s.Err())
	}
}

var _ io.ReadWriteCloser = (*frameConn)(nil)
