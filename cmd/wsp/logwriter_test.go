package main

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// countingWriter records each Write it gets.
type countingWriter struct {
	mu     sync.Mutex
	writes int
	buf    bytes.Buffer
}

func (c *countingWriter) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.writes++
	return c.buf.Write(p)
}

func (c *countingWriter) state() (int, string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.writes, c.buf.String()
}

func TestLogWriterBatches(t *testing.T) {
	var out countingWriter
	lw := newLogWriter(&out)
	for i := range 100 {
		lw.Write([]byte(strings.Repeat("x", i%7) + "line\n"))
	}
	if n, _ := out.state(); n != 0 {
		t.Fatalf("%d writes before the flush delay, want 0", n)
	}
	// The lines arrive by themselves, in one write, after the delay.
	deadline := time.Now().Add(5 * time.Second)
	for {
		n, s := out.state()
		if n > 0 {
			if n != 1 || strings.Count(s, "line\n") != 100 {
				t.Fatalf("after the delay: %d writes, %d lines; want 1 write of 100 lines", n, strings.Count(s, "line\n"))
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("lines not written within 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestLogWriterFlushAndOverflow(t *testing.T) {
	var out countingWriter
	lw := newLogWriter(&out)
	lw.Write([]byte("first\n"))
	if err := lw.Flush(); err != nil {
		t.Fatal(err)
	}
	if n, s := out.state(); n != 1 || s != "first\n" {
		t.Fatalf("after Flush: %d writes %q", n, s)
	}
	// Filling the buffer writes what waited, then keeps the new line.
	line := bytes.Repeat([]byte("y"), logBufferSize/2+1)
	lw.Write(line)
	lw.Write(line)
	if n, _ := out.state(); n != 2 {
		t.Fatalf("after overflowing the buffer: %d writes, want 2", n)
	}
	// A record larger than the buffer goes out at once, after what waited.
	big := bytes.Repeat([]byte("z"), logBufferSize+1)
	lw.Write(big)
	lw.Flush()
	n, s := out.state()
	if n != 4 || len(s) != len("first\n")+2*len(line)+len(big) || !strings.HasSuffix(s, string(big)) {
		t.Fatalf("after a large record: %d writes, %d bytes", n, len(s))
	}
}

// TestLogWriterWarnGoesOutAtOnce: a warning is written at once, with the
// lines that waited before it.
func TestLogWriterWarnGoesOutAtOnce(t *testing.T) {
	var out countingWriter
	lw := newLogWriter(&out)
	log := slog.New(flushOnWarn{slog.NewTextHandler(lw, nil), lw}).With("component", "test")
	log.Info("first")
	log.Info("second")
	if n, _ := out.state(); n != 0 {
		t.Fatalf("%d writes after two info lines, want 0 (batched)", n)
	}
	log.Warn("trouble")
	n, s := out.state()
	if n != 1 || !strings.Contains(s, "msg=first") || !strings.Contains(s, "msg=second") || !strings.Contains(s, "msg=trouble component=test") {
		t.Fatalf("after a warning: %d writes of %q, want the three lines in one write", n, s)
	}
}
