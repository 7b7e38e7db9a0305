package tunnel

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/gorilla/websocket"
)

// pair returns the two ends of a session over a real loopback WebSocket.
func pair(tb testing.TB) (srv, cli *Session) {
	tb.Helper()
	got := make(chan *Session, 1)
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		up := websocket.Upgrader{Subprotocols: []string{Subprotocol}, ReadBufferSize: ReadBufferSize, WriteBufferSize: WriteBufferSize, WriteBufferPool: WriteBufferPool}
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			tb.Error(err)
			return
		}
		s, err := NewServerSession(ws, DefaultConfig())
		if err != nil {
			tb.Error(err)
			return
		}
		got <- s
	}))
	tb.Cleanup(hs.Close)
	d := websocket.Dialer{Subprotocols: []string{Subprotocol}, ReadBufferSize: ReadBufferSize, WriteBufferSize: WriteBufferSize, WriteBufferPool: WriteBufferPool}
	ws, _, err := d.Dial("ws"+strings.TrimPrefix(hs.URL, "http"), nil)
	if err != nil {
		tb.Fatal(err)
	}
	cli, err = NewClientSession(ws, DefaultConfig())
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

// BenchmarkStreamDownload sends 10 MiB from the client end to the server end
// of one stream, as a download through wsp does.
func BenchmarkStreamDownload(b *testing.B) {
	srv, cli := pair(b)
	payload := make([]byte, 10<<20)
	go func() {
		for {
			st, err := cli.AcceptStream()
			if err != nil {
				return
			}
			go func() {
				st.Write(payload)
				st.Close()
			}()
		}
	}()
	buf := make([]byte, 32<<10)
	b.SetBytes(int64(len(payload)))
	for b.Loop() {
		st, err := srv.OpenStream()
		if err != nil {
			b.Fatal(err)
		}
		n, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{st}, buf)
		if err != nil || n != int64(len(payload)) {
			b.Fatal(n, err)
		}
		st.Close()
	}
}
