package main

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"time"
)

// Log lines are batched: under load the server writes an access log line
// per request, and a write(2) of its own for each one cost as much CPU as
// relaying the request's answer. A line waits at most logFlushDelay, or
// until logBufferSize bytes are waiting; a warning or an error goes out at
// once, with what waited before it (flushOnWarn), so the lines before a
// crash are there to read.
const (
	logFlushDelay = 50 * time.Millisecond
	logBufferSize = 64 << 10
)

// logWriter batches what is written to it into fewer writes to w. It is
// safe for concurrent use; Flush writes what is waiting at once.
type logWriter struct {
	mu    sync.Mutex
	w     io.Writer
	buf   []byte
	timer *time.Timer // the pending flush; nil while buf is empty
}

func newLogWriter(w io.Writer) *logWriter {
	return &logWriter{w: w, buf: make([]byte, 0, logBufferSize)}
}

// Write takes one log record (slog writes each with one call). It never
// fails: the lines a failing w refuses are dropped (there is nowhere else
// to report it) rather than held.
func (l *logWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.buf)+len(p) > cap(l.buf) {
		l.flushLocked()
		if len(p) > cap(l.buf) {
			l.w.Write(p)
			return len(p), nil
		}
	}
	l.buf = append(l.buf, p...)
	if l.timer == nil {
		l.timer = time.AfterFunc(logFlushDelay, func() { l.Flush() })
	}
	return len(p), nil
}

// Flush writes what is waiting.
func (l *logWriter) Flush() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.flushLocked()
}

func (l *logWriter) flushLocked() error {
	if l.timer != nil {
		l.timer.Stop()
		l.timer = nil
	}
	if len(l.buf) == 0 {
		return nil
	}
	_, err := l.w.Write(l.buf)
	l.buf = l.buf[:0]
	return err
}

// flushOnWarn is a slog handler that flushes its logWriter after every
// record at warning level or above.
type flushOnWarn struct {
	slog.Handler
	w *logWriter
}

func (h flushOnWarn) Handle(ctx context.Context, r slog.Record) error {
	err := h.Handler.Handle(ctx, r)
	if r.Level >= slog.LevelWarn {
		h.w.Flush()
	}
	return err
}

func (h flushOnWarn) WithAttrs(attrs []slog.Attr) slog.Handler {
	return flushOnWarn{h.Handler.WithAttrs(attrs), h.w}
}

func (h flushOnWarn) WithGroup(name string) slog.Handler {
	return flushOnWarn{h.Handler.WithGroup(name), h.w}
}
