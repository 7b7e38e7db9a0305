package tunnel

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/gorilla/websocket"
	"github.com/hashicorp/yamux"
)

// echo accepts streams on s and echoes each until it ends, until s closes.
// The returned function waits for every goroutine it started.
func echo(s *Session) (wait func()) {
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			st, err := s.AcceptStream()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer st.Close()
				io.Copy(st, st)
			})
		}
	})
	return wg.Wait
}

func TestSessionEcho(t *testing.T) {
	srv, cli := pair(t)
	defer echo(cli)()
	defer cli.Close()

	const streams = 8
	var wg sync.WaitGroup
	for i := range streams {
		wg.Go(func() {
			st, err := srv.OpenStream()
			if err != nil {
				t.Error(err)
				return
			}
			st.SetDeadline(time.Now().Add(10 * time.Second))
			// Larger than the initial window, so flow control works too.
			msg := bytes.Repeat(fmt.Appendf(nil, "stream %d ", i), 40000)
			var writer sync.WaitGroup
			defer writer.Wait() // after st.Close (deferred later, run first)
			defer st.Close()
			writer.Go(func() { st.Write(msg) })
			got := make([]byte, len(msg))
			if _, err := io.ReadFull(st, got); err != nil {
				t.Errorf("stream %d: %v", i, err)
				return
			}
			if !bytes.Equal(got, msg) {
				t.Errorf("stream %d: echo differs", i)
			}
		})
	}
	wg.Wait()
}

func TestSessionIdleFor(t *testing.T) {
	srv, cli := pair(t)
	// Keepalives are 15 s apart: nothing arrives on a fresh pair meanwhile.
	first := srv.IdleFor()
	if first < 0 {
		t.Fatalf("IdleFor = %v", first)
	}
	waitFor(t, "IdleFor to grow", func() bool { return srv.IdleFor() > first+20*time.Millisecond })
	before := srv.IdleFor()
	// A ping's answer is something received.
	if _, err := srv.Ping(); err != nil {
		t.Fatal(err)
	}
	if after := srv.IdleFor(); after >= before {
		t.Fatalf("IdleFor = %v after a ping answer, want less than %v", after, before)
	}
	if cli.IdleFor() >= before {
		t.Fatalf("client IdleFor = %v after receiving a ping, want less than %v", cli.IdleFor(), before)
	}
}

func TestSessionCloseSeenByPeer(t *testing.T) {
	for _, name := range []string{"client closes", "server closes"} {
		t.Run(name, func(t *testing.T) {
			srv, cli := pair(t)
			closer, other := cli, srv
			if name == "server closes" {
				closer, other = srv, cli
			}
			if other.Err() != nil {
				t.Fatalf("Err() = %v on a live session", other.Err())
			}
			closer.Close()
			waitFor(t, "the peer's CloseChan", func() bool {
				select {
				case <-other.CloseChan():
					return true
				default:
					return false
				}
			})
			if other.Err() == nil {
				t.Error("Err() = nil after the connection ended")
			}
			if !other.IsClosed() {
				t.Error("IsClosed() = false")
			}
			if _, err := other.OpenStream(); !IsSessionGone(err) {
				t.Errorf("OpenStream on a closed session: %v, want one IsSessionGone accepts", err)
			}
		})
	}
}

// The peer sees the reason of CloseWithReason as its session's end, cut
// to what a close message carries.
func TestSessionCloseWithReason(t *testing.T) {
	for _, reason := range []string{"this client already holds a session to this node", strings.Repeat("é", 100)} {
		srv, cli := pair(t)
		cli.CloseWithReason(reason)
		waitFor(t, "the peer's CloseChan", func() bool {
			select {
			case <-srv.CloseChan():
				return true
			default:
				return false
			}
		})
		var ce *websocket.CloseError
		if !errors.As(srv.Err(), &ce) || ce.Code != websocket.CloseNormalClosure || !strings.HasPrefix(reason, ce.Text) || len(ce.Text) > maxCloseReason || !utf8.ValidString(ce.Text) {
			t.Errorf("peer's Err() = %v, want a normal close saying %.20q...", srv.Err(), reason)
		}
	}
}

func TestSessionRemoteAddr(t *testing.T) {
	srv, cli := pair(t)
	for _, s := range []*Session{srv, cli} {
		a, ok := s.RemoteAddr().(*net.TCPAddr)
		if !ok || !a.IP.IsLoopback() {
			t.Errorf("RemoteAddr = %v, want a loopback TCP address", s.RemoteAddr())
		}
	}
}

func TestIsSessionGone(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{yamux.ErrSessionShutdown, true},
		{fmt.Errorf("open: %w", yamux.ErrRemoteGoAway), true},
		{yamux.ErrStreamsExhausted, true},
		{yamux.ErrConnectionWriteTimeout, true},
		{yamux.ErrKeepAliveTimeout, true},
		{yamux.ErrStreamClosed, false},
		{yamux.ErrTimeout, false},
		{io.EOF, false},
		{errors.New("boom"), false},
		{nil, false},
	} {
		if got := IsSessionGone(tc.err); got != tc.want {
			t.Errorf("IsSessionGone(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*Config)
		ok   bool
	}{
		{"default", func(*Config) {}, true},
		{"no keepalive", func(c *Config) { c.KeepAlive = 0 }, true},
		{"small window", func(c *Config) { c.StreamWindow = 1024 }, false},
		{"no backlog", func(c *Config) { c.AcceptBacklog = 0 }, false},
	} {
		c := DefaultConfig()
		tc.edit(&c)
		if err := c.Validate(); (err == nil) != tc.ok {
			t.Errorf("%s: Validate() = %v", tc.name, err)
		}
	}
}
