package test

import (
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// bigMiB is the size of the big bodies of the streaming tests: 256 MiB by
// default, `go test ./test -run Big -bigbody 1024` for 1 GiB.
var bigMiB = flag.Int("bigbody", 256, "size in MiB of the big bodies that streaming tests send")

// bigSize() is the size of a big body, in bytes.
func bigSize() int64 { return int64(*bigMiB) << 20 }

// memoryBound is how much the heap of this process (app, server, client and
// backend together) may grow while a big body streams through.
const memoryBound = 64 << 20

// pattern is a reproducible pseudo-random byte stream of n bytes.
func pattern(seed uint64, n int64) io.Reader {
	return io.LimitReader(&prng{r: rand.NewChaCha8([32]byte{byte(seed)})}, n)
}

type prng struct{ r *rand.ChaCha8 }

func (p *prng) Read(b []byte) (int, error) { return p.r.Read(b) }

func patternSum(seed uint64, n int64) string {
	h := sha256.New()
	io.Copy(h, pattern(seed, n))
	return hex.EncodeToString(h.Sum(nil))
}

// heapWatch samples the live heap until stopped and reports its peak growth.
type heapWatch struct {
	base uint64
	peak atomic.Uint64
	stop chan struct{}
	wg   sync.WaitGroup
}

func watchHeap() *heapWatch {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	w := &heapWatch{base: m.HeapInuse, stop: make(chan struct{})}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-w.stop:
				return
			case <-t.C:
				var m runtime.MemStats
				runtime.ReadMemStats(&m)
				if m.HeapInuse > w.peak.Load() {
					w.peak.Store(m.HeapInuse)
				}
			}
		}
	}()
	return w
}

func (w *heapWatch) growth() int64 {
	close(w.stop)
	w.wg.Wait()
	return int64(w.peak.Load()) - int64(w.base)
}

func TestBigDownloadStreamsInBoundedMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("moves 256 MiB")
	}
	r, b := setup(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		w.Header().Set("Content-Length", strconv.FormatInt(bigSize(), 10))
		io.Copy(w, pattern(1, bigSize()))
	}))
	want := patternSum(1, bigSize())
	hw := watchHeap()
	resp := do(t, r.request(t, "GET", b.URL+"/big", nil))
	h := sha256.New()
	n, err := io.Copy(h, resp.Body)
	growth := hw.growth()
	if err != nil || n != bigSize() {
		t.Fatalf("read %d bytes: %v", n, err)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != want {
		t.Fatalf("sha256 %s, want %s", got, want)
	}
	t.Logf("heap growth during a %d MiB download: %.1f MiB", bigSize()>>20, float64(growth)/(1<<20))
	if growth > memoryBound {
		t.Fatalf("heap grew by %d MiB, bound %d MiB", growth>>20, memoryBound>>20)
	}
}

func TestBigUploadStreamsInBoundedMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("moves 256 MiB")
	}
	r, b := setup(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, req.Body)
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		fmt.Fprintf(w, "%d %x", n, h.Sum(nil))
	}))
	want := fmt.Sprintf("%d %s", bigSize(), patternSum(2, bigSize()))
	for _, chunked := range []bool{false, true} {
		hw := watchHeap()
		req := r.request(t, "PUT", b.URL+"/big", pattern(2, bigSize()))
		if !chunked {
			req.ContentLength = bigSize()
		}
		resp := do(t, req)
		got := readAll(t, resp.Body)
		growth := hw.growth()
		if resp.StatusCode != 200 || got != want {
			t.Fatalf("chunked=%v: status %d body %q, want %q", chunked, resp.StatusCode, got, want)
		}
		t.Logf("heap growth during a %d MiB upload (chunked=%v): %.1f MiB", bigSize()>>20, chunked, float64(growth)/(1<<20))
		if growth > memoryBound {
			t.Fatalf("heap grew by %d MiB, bound %d MiB", growth>>20, memoryBound>>20)
		}
	}
}
