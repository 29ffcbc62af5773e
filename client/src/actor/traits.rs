//! The method, task and constructor traits, implemented for fn items and capture-less
//! closures of up to six arguments.

use crate::outcome::Outcome;

/// A method of actor type `A` taking the argument tuple `Args`: `Type::method` or a closure
/// without captures, `Fn(&mut A, T1, .., Tn) -> O` ([`Exclusive`]) or `Fn(&A, T1, .., Tn) -> O`
/// ([`Shared`]) for up to six arguments. `K` is inferred from the method's receiver.
pub trait Method<A, Args, K = Exclusive>: Copy + Send + 'static {
    /// What the method returns.
    type Output: Outcome;
    /// Whether the method takes `&self` (on a threaded actor it runs beside other such
    /// calls; a `&mut self` method runs alone).
    const SHARED: bool;
    /// Calls the method on `actor` with the arguments spread out.
    ///
    /// # Safety
    /// `actor` points at a live `A`; while the call runs, nothing else uses it if the method
    /// is not [`Method::SHARED`], and nothing mutates it if it is.
    unsafe fn invoke(self, actor: *mut A, args: Args) -> Self::Output;
}

/// The receiver kind of a `&mut self` method (see [`Method`]).
#[derive(Debug, Clone, Copy)]
pub enum Exclusive {}

/// The receiver kind of a `&self` method (see [`Method`]).
#[derive(Debug, Clone, Copy)]
pub enum Shared {}

/// A task function taking the argument tuple `Args` (up to six arguments).
pub trait Function<Args>: Copy + Send + 'static {
    /// What the task returns.
    type Output: Outcome;
    /// Calls the function with the arguments spread out.
    fn invoke(self, args: Args) -> Self::Output;
}

/// An actor constructor: `Type::default`, `Type::new`, or a closure without captures.
pub trait Constructor<A, Args>: Copy + Send + 'static {
    /// Builds the actor from the arguments spread out.
    fn construct(self, args: Args) -> A;
}

macro_rules! arities {
    ($(($($t:ident $v:ident),*)),* $(,)?) => {$(
        impl<A, F, O, $($t),*> Method<A, ($($t,)*), Exclusive> for F
        where
            F: Fn(&mut A, $($t),*) -> O + Copy + Send + 'static,
            O: Outcome,
        {
            type Output = O;
            const SHARED: bool = false;
            #[allow(unused_variables)]
            unsafe fn invoke(self, actor: *mut A, ($($v,)*): ($($t,)*)) -> O {
                // SAFETY: per the contract, a live `A` nothing else uses meanwhile.
                self(unsafe { &mut *actor }, $($v),*)
            }
        }
        impl<A, F, O, $($t),*> Method<A, ($($t,)*), Shared> for F
        where
            F: Fn(&A, $($t),*) -> O + Copy + Send + 'static,
            O: Outcome,
        {
            type Output = O;
            const SHARED: bool = true;
            #[allow(unused_variables)]
            unsafe fn invoke(self, actor: *mut A, ($($v,)*): ($($t,)*)) -> O {
                // SAFETY: per the contract, a live `A` nothing mutates meanwhile.
                self(unsafe { &*actor }, $($v),*)
            }
        }
        impl<F, O, $($t),*> Function<($($t,)*)> for F
        where
            F: Fn($($t),*) -> O + Copy + Send + 'static,
            O: Outcome,
        {
            type Output = O;
            #[allow(unused_variables)]
            fn invoke(self, ($($v,)*): ($($t,)*)) -> O {
                self($($v),*)
            }
        }
        impl<A, F, $($t),*> Constructor<A, ($($t,)*)> for F
        where
            F: Fn($($t),*) -> A + Copy + Send + 'static,
        {
            #[allow(unused_variables)]
            fn construct(self, ($($v,)*): ($($t,)*)) -> A {
                self($($v),*)
            }
        }
    )*};
}

arities!(
    (),
    (T1 a),
    (T1 a, T2 b),
    (T1 a, T2 b, T3 c),
    (T1 a, T2 b, T3 c, T4 d),
    (T1 a, T2 b, T3 c, T4 d, T5 e),
    (T1 a, T2 b, T3 c, T4 d, T5 e, T6 f),
);

/// The value of a zero-sized function type.
pub(crate) fn conjure<F: Copy>() -> F {
    const {
        assert!(
            size_of::<F>() == 0,
            "methods and tasks must be fn items or closures without captures"
        )
    };
    // SAFETY: F is zero-sized (asserted at compile time) and a fn item or capture-less
    // closure (the only zero-sized types implementing the Fn traits that callers can name
    // here), which have no bytes and so no invalid values.
    unsafe { std::mem::zeroed::<F>() }
}
