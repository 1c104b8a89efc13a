package session

import (
	"context"
	"fmt"

	"github.com/kvmscope/kvmscope/introspect"
	"github.com/kvmscope/kvmscope/rules"
)

// crossViews runs the cross-view checks of hidden tasks and modules
// and puts what they found into sub; it returns the views and what
// could not be checked. A view that did not run is a warning, never a
// silent all clear.
func (s *Session) crossViews(ctx context.Context, sub *rules.Subject) ([]introspect.ViewResult, []string) {
	var views []introspect.ViewResult
	var warnings []string
	_, err := s.scan(ctx, "crossview", false, func(k *introspect.Kernel, off *introspect.Offsets) error {
		tv, err := k.CrossViewTasks(off)
		if err != nil {
			warnings = append(warnings, fmt.Sprintf("hidden processes not judged: %v", err))
		} else {
			views = append(views, tv.Views...)
			warnings = append(warnings, tv.Warnings...)
			sub.HiddenProcesses = []rules.Hidden{}
			for _, h := range tv.Hidden {
				sub.HiddenProcesses = append(sub.HiddenProcesses, rules.Hidden{Name: h.Comm, PID: h.PID, Addr: h.Task, SeenBy: h.SeenBy, MissingFrom: h.MissingFrom})
			}
		}
		mv, err := k.CrossViewModules(off)
		if err != nil {
			warnings = append(warnings, fmt.Sprintf("hidden modules not judged: %v", err))
		} else {
			views = append(views, mv.Views...)
			warnings = append(warnings, mv.Warnings...)
			sub.HiddenModules = []rules.Hidden{}
			for _, h := range mv.Hidden {
				sub.HiddenModules = append(sub.HiddenModules, rules.Hidden{Name: h.Name, Addr: h.Addr, SeenBy: h.SeenBy, MissingFrom: h.MissingFrom})
			}
		}
		return nil
	})
	if err != nil {
		warnings = append(warnings, fmt.Sprintf("cross-views not run: %v", err))
	}
	for _, v := range views {
		if !v.Ran {
			warnings = append(warnings, fmt.Sprintf("view %s not run: %s", v.Name, v.Reason))
		}
	}
	return views, warnings
}
