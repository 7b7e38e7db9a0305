package test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/coder/websocket"
)

// BenchmarkRelaySmallGet measures small GETs through server and client, in
// one process, with b.SetParallelism-many concurrent apps per core.
func BenchmarkRelaySmallGet(b *testing.B) {
	r, be := setup(b, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "a small answer, like most API calls give")
	}))
	tr := &http.Transport{MaxIdleConnsPerHost: 256}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	b.SetParallelism(parallelism)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			req, _ := http.NewRequest("GET", r.url+"/request", nil)
			req.Header.Set("X-Proxy-Destination", be.URL+"/small")
			resp, err := hc.Do(req)
			if err != nil {
				b.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				b.Errorf("status %d", resp.StatusCode)
				return
			}
		}
	})
}

var parallelism = 32

// BenchmarkDirectSmallGet is the baseline: the same GETs, straight to the
// backend.
func BenchmarkDirectSmallGet(b *testing.B) {
	be := backend(b, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "a small answer, like most API calls give")
	}))
	tr := &http.Transport{MaxIdleConnsPerHost: 256}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	b.SetParallelism(parallelism)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			resp, err := hc.Get(be.URL + "/small")
			if err != nil {
				b.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	})
}

// sink accepts connections and sends each size bytes, then closes it.
func sink(b *testing.B, size int) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	payload := make([]byte, size)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { c.Write(payload); c.Close() }()
		}
	}()
	return ln.Addr().String()
}

// BenchmarkConnectDownload moves 10 MiB per op through a CONNECT tunnel
// (wsp) or straight from the source (direct).
func BenchmarkConnectDownload(b *testing.B) {
	const size = 10 << 20
	src := sink(b, size)
	r := startServer(b, serverConfig(), nil)
	startClient(b, clientConfig(r, "c1"))
	buf := make([]byte, 64<<10)
	for _, mode := range []string{"direct", "wsp"} {
		b.Run(mode, func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				var c net.Conn
				var rd io.Reader
				var err error
				if mode == "direct" {
					c, err = net.Dial("tcp", src)
					rd = c
				} else {
					c, err = net.Dial("tcp", r.addr)
					if err == nil {
						fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", src, src)
						br := bufio.NewReader(c)
						if resp, rerr := http.ReadResponse(br, &http.Request{Method: "CONNECT"}); rerr != nil || resp.StatusCode != 200 {
							b.Fatal(resp, rerr)
						}
						rd = br
					}
				}
				if err != nil {
					b.Fatal(err)
				}
				n, err := io.CopyBuffer(io.Discard, rd, buf)
				c.Close()
				if err != nil || n != size {
					b.Fatal(n, err)
				}
			}
		})
	}
}

// BenchmarkWebSocketEcho measures message round trips on one WebSocket,
// through wsp's /request entry or straight to the echo server.
func BenchmarkWebSocketEcho(b *testing.B) {
	echo := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		for {
			typ, msg, err := c.Read(r.Context())
			if err != nil {
				return
			}
			if c.Write(r.Context(), typ, msg) != nil {
				return
			}
		}
	}))
	b.Cleanup(echo.Close)
	r := startServer(b, serverConfig(), nil)
	startClient(b, clientConfig(r, "c1"))
	wsURL := "ws" + strings.TrimPrefix(echo.URL, "http")
	msg := []byte(strings.Repeat("m", 128))
	for _, mode := range []string{"direct", "wsp"} {
		b.Run(mode, func(b *testing.B) {
			ctx := context.Background()
			target, opts := wsURL, &websocket.DialOptions{}
			if mode == "wsp" {
				target = "ws://" + r.addr + "/request"
				opts.HTTPHeader = http.Header{"X-Proxy-Destination": {wsURL}}
			}
			c, _, err := websocket.Dial(ctx, target, opts)
			if err != nil {
				b.Fatal(err)
			}
			defer c.CloseNow()
			for b.Loop() {
				if err := c.Write(ctx, websocket.MessageBinary, msg); err != nil {
					b.Fatal(err)
				}
				if _, _, err := c.Read(ctx); err != nil {
					b.Fatal(err)
				}
			}
			c.Close(websocket.StatusNormalClosure, "")
		})
	}
}
