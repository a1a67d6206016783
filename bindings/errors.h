// The translation of the core's exceptions to Python's, shared by syncbn's modules.
#pragma once

#include <nanobind/nanobind.h>

#include "syncbn/errors.h"

namespace syncbn::bindings {

// syncbn.CollectiveMismatchError (a RuntimeError), made by the _core module at import.
// Every module that registers these translators has its own copy of this static (each
// extension is its own shared object), and nanobind tries the translator registered last
// first, so a module other than _core finds the type through syncbn._core.
inline PyObject*& collective_mismatch_slot() {
  static PyObject* type = nullptr;
  return type;
}

inline PyObject* collective_mismatch_type() {
  PyObject*& type = collective_mismatch_slot();
  if (type == nullptr) {
    PyObject* core = PyImport_ImportModule("syncbn._core");
    if (core != nullptr) {
      type = PyObject_GetAttrString(core, "CollectiveMismatchError");  // kept for good
      Py_DECREF(core);
    }
    if (type == nullptr) PyErr_Clear();
  }
  return type;
}

inline void register_exception_translators() {
  nanobind::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const syncbn::CollectiveMismatchError& e) {
      PyObject* t = collective_mismatch_type();
      PyErr_SetString(t ? t : PyExc_RuntimeError, e.what());
    } catch (const syncbn::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const syncbn::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const syncbn::CommError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });
}

}  // namespace syncbn::bindings
