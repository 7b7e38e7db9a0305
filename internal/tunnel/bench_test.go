package tunnel

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/coder/websocket"
)

// pair returns the two ends of a session over a real loopback WebSocket.
func pair(tb testing.TB) (srv, cli *Session) {
	tb.Helper()
	got := make(chan *Session, 1)
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{Subprotocol}})
		if err != nil {
			tb.Error(err)
			return
		}
		s, err := NewServerSession(context.Background(), ws, DefaultConfig())
		if err != nil {
			tb.Error(err)
			return
		}
		got <- s
	}))
	tb.Cleanup(hs.Close)
	ws, _, err := websocket.Dial(context.Background(), "ws"+strings.TrimPrefix(hs.URL, "http"), &websocket.DialOptions{Subprotocols: []string{Subprotocol}})
	if err != nil {
		tb.Fatal(err)
	}
	cli, err = NewClientSession(context.Background(), ws, DefaultConfig())
	if err != nil {
		tb.Fatal(err)
	}
	srv = <-got
	tb.Cleanup(func() { cli.Close(); srv.Close() })
	return srv, cli
}

// BenchmarkStreamRoundTrip opens a stream, sends a small request, reads a
// small answer and closes: the tunnel's share of every relayed request.
func BenchmarkStreamRoundTrip(b *testing.B) {
	srv, cli := pair(b)
	go func() {
		for {
			st, err := cli.AcceptStream()
			if err != nil {
				return
			}
			go func() {
				buf := make([]byte, 512)
				n, _ := st.Read(buf)
				st.Write(buf[:n])
				st.Close()
			}()
		}
	}()
	msg := []byte(strings.Repeat("x", 200))
	buf := make([]byte, 512)
	b.ResetTimer()
	for b.Loop() {
		st, err := srv.OpenStream()
		if err != nil {
			b.Fatal(err)
		}
		st.Write(msg)
		if _, err := io.ReadFull(st, buf[:len(msg)]); err != nil {
			b.Fatal(err)
		}
		st.Close()
	}
}
