package main

import (
	"io"
	"sync"
	"time"
)

// Log lines are batched: under load the server writes an access log line
// per request, and a write(2) of its own for each one cost as much CPU as
// relaying the request's answer. A line waits at most logFlushDelay, or
// until logBufferSize bytes are waiting.
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
// fails: an error of w is returned by the Flush that meets it, and the
// lines it concerned are dropped rather than blocking the logger.
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
